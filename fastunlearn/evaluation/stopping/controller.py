"""The stopping state machine, :class:`StoppingController`: told each evaluation's metrics, it answers
whether to stop, whether to keep a copy of the current state, and which state to restore at the end."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastunlearn.evaluation.stopping.rules import (
    METRIC_NAMES,
    StopRule,
    is_generated,
    is_retain,
    unknown_metric,
)

RESTORE = ("first", "best", "last")
DEFAULT_RETAIN_METRICS = ("retain.prob", "retain.acc", "retain.rougeL")


def retain_score(values: Mapping[str, float], baseline: Mapping[str, float], names: Iterable[str]) -> float:
    """Retain performance kept: the harmonic mean of ``values[m] / baseline[m]`` over ``names`` (1 = as
    before). Relative, because the metrics sit on different scales; harmonic (as TOFU's model utility,
    Maini et al. 2024), because one lost ability cannot be rescued by the others. A metric on which
    the original model scores 0 has no ability to keep and is left out."""
    ratios = []
    for name in names:
        if name not in values or name not in baseline:
            raise ValueError(f"retain score: {name} is missing")
        if baseline[name] > 0:
            ratios.append(values[name] / baseline[name])
    if not ratios:
        raise ValueError("retain score: the original model scores 0 on every retain metric")
    if min(ratios) <= 0:
        return 0.0
    return len(ratios) / sum(1.0 / r for r in ratios)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation during training: its step, epoch, metrics, whether the rule held, retain score."""

    step: int
    epoch: float
    metrics: Mapping[str, float]
    satisfied: bool
    score: float | None = None


@dataclass(frozen=True)
class Decision:
    """What the trainer does after an evaluation: ``stop`` now; ``keep_state``: copy the trainable
    parameters, as this state may have to be restored after more training (never when stopping or at
    the final step, whose state is the current one)."""

    stop: bool
    satisfied: bool
    keep_state: bool


def parse_eval_every(value: int | str) -> int | Literal["epoch"]:
    """``"epoch"`` or a positive number of optimiser steps (an int or its decimal string)."""
    if value == "epoch":
        return "epoch"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"eval_every must be 'epoch' or a positive number of optimiser steps, got {value!r}")
    return value


class StoppingController:
    """The stopping state machine: :meth:`record` one evaluation at a time, get a :class:`Decision`;
    ``every`` (:func:`parse_eval_every`) says when its callback evaluates.

    With ``patience = K`` the run goes on for K evaluations after the rule first holds. ``restore``
    keeps, among the evaluated states that satisfy it, the ``"first"``, the ``"best"`` (highest
    :func:`retain_score` against :meth:`set_baseline`'s metrics; ties to the earlier) or the ``"last"``;
    the final state when it never holds. ``rule=None`` only records. :meth:`metrics_to_compute` asks
    for the rule's generated metrics only where every teacher-forced bound is within
    ``generate_within · |value|`` of holding: a conjunction cannot hold while one bound fails, so no
    decision changes.
    """

    def __init__(
        self,
        rule: StopRule | None,
        *,
        every: int | str = "epoch",
        patience: int = 0,
        restore: str = "first",
        generate_within: float = 0.0,
        retain_metrics: Sequence[str] = DEFAULT_RETAIN_METRICS,
        track: Sequence[str] = (),
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative number of evaluations, got {patience!r}")
        if restore not in RESTORE:
            raise ValueError(f"unknown restore policy {restore!r}; expected one of {list(RESTORE)}")
        if rule is None and (patience or restore != "first"):
            raise ValueError("patience and restore need a stopping rule (stop=... / --stop-when)")
        if restore != "first" and patience == 0:
            raise ValueError(
                f"restore={restore!r} chooses among the evaluations after the rule first holds; with "
                "patience 0 training stops there and there is one: give patience >= 1"
            )
        margin = generate_within
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < math.inf:
            raise ValueError(
                "generate_within must be a finite margin >= 0 (a fraction of each bound's value), got "
                f"{margin!r}"
            )
        for name in (*retain_metrics, *track):
            if name not in METRIC_NAMES:
                raise ValueError(unknown_metric(name, name))
        if not all(map(is_retain, retain_metrics)):
            raise ValueError(f"retain_metrics must be retain-set metrics, got {list(retain_metrics)}")
        if restore == "best" and not retain_metrics:
            raise ValueError(
                "restore='best' ranks the states by retain performance, but no retain metric is "
                "available (there is no retain set)"
            )
        generated = [m for m in track if is_generated(m)]
        if generated:
            raise ValueError(f"track holds teacher-forced metrics only (no generation); got {generated}")
        self.every, self.generate_within = parse_eval_every(every), float(generate_within)
        self.rule, self.patience, self.restore = rule, patience, restore
        self.retain_metrics, self.track = tuple(retain_metrics), tuple(track)
        self.baseline: dict[str, float] | None = None
        self.history: list[Evaluation] = []
        self.first: Evaluation | None = None
        self.chosen: Evaluation | None = None
        self.stopped: Evaluation | None = None

    def _rule_metrics(self) -> tuple[str, ...]:
        return () if self.rule is None else self.rule.metrics

    def baseline_metrics(self) -> frozenset[str]:
        """What to measure on the original model: what the rule, ``track`` and the retain score read."""
        scored = self.retain_metrics if self.restore == "best" else ()
        return frozenset((*self._rule_metrics(), *scored, *self.track))

    def set_baseline(self, values: Mapping[str, float]) -> None:
        """Record the original model's metrics (before any training step)."""
        if self.restore == "best":
            missing = [m for m in self.retain_metrics if m not in values]
            if missing:
                raise ValueError(f"the baseline lacks the retain metrics {missing}")
            if all(values[m] <= 0 for m in self.retain_metrics):
                raise ValueError(
                    "restore='best' ranks states by retain performance relative to the original model, "
                    f"but the original model scores 0 on every retain metric {list(self.retain_metrics)}"
                )
        self.baseline = dict(values)

    def metrics_to_compute(self, values: Mapping[str, float]) -> frozenset[str]:
        """The metrics to evaluate next given those computed at this evaluation (class docstring);
        empty when it can be :meth:`record` ed. Call repeatedly, merging the results."""
        cheap = {m for m in (*self._rule_metrics(), *self.track) if not is_generated(m)}
        todo = cheap - values.keys()
        if todo or self.rule is None:
            return frozenset(todo)
        generated = [m for m in self.rule.metrics if is_generated(m) and m not in values]
        if generated:
            cheap_bounds = [b for b in self.rule.bounds if not is_generated(b.metric)]
            if all(b.near(values[b.metric], self.generate_within) for b in cheap_bounds):
                return frozenset(generated)
            return frozenset()
        if self.restore == "best" and self.rule.satisfied(values):
            return frozenset(m for m in self.retain_metrics if m not in values)
        return frozenset()

    def record(
        self, step: int, epoch: float, values: Mapping[str, float], *, final: bool = False
    ) -> Decision:
        """Record the evaluation of the state after ``step`` optimiser steps and decide; ``final``:
        training ends after this step anyway."""
        if self.stopped is not None:
            raise ValueError(f"the run stopped at step {self.stopped.step}; nothing more to record")
        if self.history and step <= self.history[-1].step:
            raise ValueError(f"step {step} is not after the last evaluated step {self.history[-1].step}")
        satisfied = False
        if self.rule is not None:
            verdict = self.rule.satisfied(values)
            if verdict is None:
                missing = [m for m in self.rule.metrics if m not in values]
                raise ValueError(
                    f"cannot decide the rule at step {step}: {missing} not computed while every computed "
                    "bound holds (evaluate what metrics_to_compute asks for)"
                )
            satisfied = verdict
        score = None
        if satisfied and self.restore == "best":
            if self.baseline is None:
                raise ValueError("restore='best' needs the original model's metrics: call set_baseline")
            score = retain_score(values, self.baseline, self.retain_metrics)
        ev = Evaluation(step, float(epoch), dict(values), satisfied, score)
        self.history.append(ev)

        if satisfied:
            if self.first is None:
                self.first = ev
            if (
                self.chosen is None
                or self.restore == "last"
                or (self.restore == "best" and score > self.chosen.score)
            ):
                self.chosen = ev
        stop = self.first is not None and self.history.index(self.first) + self.patience < len(self.history)
        if stop:
            self.stopped = ev
        keep = self.chosen is ev and not stop and not final
        return Decision(stop=stop, satisfied=satisfied, keep_state=keep)

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to go on after an interruption, JSON-serialisable; the
        rule by its text, which the resumed run's (its reference measured again) must reproduce."""
        if self.stopped is not None:
            raise ValueError(f"the run stopped at step {self.stopped.step}: there is nothing to resume")
        return {
            "rule": None if self.rule is None else str(self.rule),
            "baseline": self.baseline,
            "history": [asdict(ev) for ev in self.history],
            "first": None if self.first is None else self.history.index(self.first),
            "chosen": None if self.chosen is None else self.history.index(self.chosen),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s record of an interrupted run of the same rule."""
        saved_rule = state.get("rule")
        rule = None if self.rule is None else str(self.rule)
        if saved_rule != rule:
            raise ValueError(
                f"cannot resume: the interrupted run stopped by {saved_rule!r}, this one by {rule!r} (a "
                "reference measured again must give the same values)"
            )
        self.baseline = None if state["baseline"] is None else dict(state["baseline"])
        self.history = [Evaluation(**ev) for ev in state["history"]]
        self.first = None if state["first"] is None else self.history[state["first"]]
        self.chosen = None if state["chosen"] is None else self.history[state["chosen"]]
        self.stopped = None

    @property
    def restore_target(self) -> Evaluation | None:
        """The evaluation whose state must be put back at the end; ``None`` when it is the current one."""
        if self.chosen is None or not self.history or self.chosen is self.history[-1]:
            return None
        return self.chosen

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable outcome: the rule, the steps where it first held, stopped, and was kept."""
        kept = self.chosen or (self.history[-1] if self.history else None)
        return {
            "rule": None if self.rule is None else str(self.rule),
            "patience": self.patience,
            "restore": self.restore,
            "evaluations": len(self.history),
            "first_satisfied_step": None if self.first is None else self.first.step,
            "stopped_step": None if self.stopped is None else self.stopped.step,
            "kept_step": None if kept is None else kept.step,
            "kept_metrics": None if kept is None else dict(kept.metrics),
            "restored": self.restore_target is not None,
            "satisfied": self.first is not None,
        }
