"""Evaluation during training, feeding a stopping rule: :class:`StoppingCallback`, a
``transformers.TrainerCallback`` (it does not import the training loop), and its trajectory:
``trajectory.csv`` (:class:`Trajectory`: one row per evaluation, step 0 before unlearning, columns
``step``, ``epoch``, the metrics, then :data:`TRAILING`; rewritten whole and atomically after every row,
so the header covers every row) and ``trajectory.png`` (:func:`plot_trajectory`)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from fastunlearn._io import atomic_file, write_json, write_text
from fastunlearn.engines import distributed
from fastunlearn.engines.distributed import gathered
from fastunlearn.evaluation.sets import SetEvaluator
from fastunlearn.evaluation.stopping import StoppingController, StopRule
from fastunlearn.evaluation.stopping.rules import KINDS, METRIC_NAMES, Bound, is_retain, kind_of

# Beside each Trainer checkpoint of a run that evaluates during training (StoppingCallback.on_save).
RECORD_FILE = "stopping.json"
SNAPSHOT_FILE = "stopping_snapshot.safetensors"
# The training loss logged at the step (its mean since the previous log), whether the rule held, the
# best-restore criterion, seconds spent evaluating.
TRAILING = ("loss", "forget_loss", "retain_loss", "satisfied", "retain_score", "eval_s")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return str(value)  # a float's shortest repr: it round-trips exactly


class Trajectory:
    """Evaluation rows kept in memory and, with a ``path``, written to a CSV file after each append."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.rows: list[dict[str, Any]] = []

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one evaluation (it needs ``step``) and rewrite the file atomically."""
        if "step" not in row:
            raise ValueError(f"a trajectory row needs a 'step', got {sorted(row)}")
        self.rows.append(dict(row))
        self.write()

    def write(self) -> None:
        """Write the rows held now (a resumed run's replace what an interrupted one left after them)."""
        if self.path is None:
            return
        names = {key for row in self.rows for key in row}
        known = ["step", "epoch", *METRIC_NAMES, *TRAILING]
        columns = [c for c in known if c in names] + sorted(names - set(known))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_cell(row.get(c)) for c in columns] for row in self.rows)
        write_text(self.path, out.getvalue())


def _parse_cell(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_trajectory(path: str | os.PathLike) -> list[dict[str, float | str | None]]:
    """The rows of a ``trajectory.csv``: numbers as floats (``step`` as int), empty cells as ``None``,
    anything else as text."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [{k: _parse_cell(v) for k, v in raw.items()} for raw in csv.DictReader(f)]
    for row in rows:
        row["step"] = int(row["step"])
    return rows


_COLOURS = {kind: f"C{i}" for i, kind in enumerate(KINDS)}
_kind = lambda name: name.partition(".")[2]
_MARK_STYLES = ("-.", "--", ":")


def plot_trajectory(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    bounds: Sequence[Bound] = (),
    marks: Mapping[str, int | None] | None = None,
    title: str | None = None,
) -> None:
    """Draw forget (solid) and retain (dashed) metrics over optimiser steps, one colour per kind, the
    rule's bounds dotted in their metric's colour, ``marks`` (label → step) as vertical lines, and the
    training loss and NLL in a second panel; written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(name: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None and math.isfinite(r[name])]
        return [p[0] for p in pts], [p[1] for p in pts]

    # Rates share one axis; the NLL is unbounded and drawn with the loss instead.
    rates = [m for m in METRIC_NAMES if kind_of(m).upper == 1.0 and series(m)[0]]
    losses = [n for n in ("loss", "forget_loss", "retain_loss", "forget.nll", "retain.nll") if series(n)[0]]
    fig = Figure(figsize=(9, 7 if losses else 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if losses else 1, 1, 1)
    for name in rates:
        style = "--" if is_retain(name) else "-"
        ax.plot(*series(name), style, marker="o", markersize=3, color=_COLOURS[_kind(name)], label=name)
    for bound in bounds:
        ax.axhline(bound.value, linestyle=":", color=_COLOURS[_kind(bound.metric)], label=f"rule: {bound}")
    for i, (label, step) in enumerate((marks or {}).items()):
        if step is not None:
            style = _MARK_STYLES[i % len(_MARK_STYLES)]
            ax.axvline(step, linestyle=style, color="black", alpha=0.6, label=f"{label} (step {step})")
    ax.set_ylabel("metric (mean over the evaluated subset)")
    ax.set_title(title or "", fontsize=9)
    axes = [ax]
    if losses:
        axes.append(fig.add_subplot(2, 1, 2, sharex=ax))
        for name in losses:
            axes[1].plot(*series(name), "--" if "retain" in name else "-", marker=".", label=name)
        axes[1].set_ylabel("loss / NLL")
    for a in axes:
        a.set_xlabel("optimiser step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train (the adapters: small). Under ZeRO-3 each is gathered
    whole, one at a time (a collective: every rank keeps a state at the same evaluations); under FSDP2
    a parameter is a ``DTensor``, and its copy is this rank's shard."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with gathered([param]):
                state[name] = param.detach().to("cpu", copy=True)
    return state


def measure_reference(rule: StopRule, evaluator: SetEvaluator, model: torch.nn.Module) -> StopRule:
    """``rule`` resolved with its reference values measured on ``model`` (the model before unlearning,
    or the retain-only / retrained one, sharing the tokenizer) by ``evaluator``."""
    if rule.resolved:
        return rule
    return rule.with_reference(evaluator.evaluate(model, rule.spec.measured))


class StoppingCallback(TrainerCallback):
    """Evaluate during training, stop by a rule, keep the chosen state, write the trajectory.

    The model at ``on_train_begin`` is the baseline (step 0); then every ``controller.every`` optimiser
    steps (or each ``"epoch"``, and the final step) the controller's ``metrics_to_compute`` is followed
    until it asks for nothing. States the controller may restore are copied to the CPU and the chosen
    one is put back at ``on_train_end``. Every rank runs the callback and gets the main process's
    numbers, so all decide alike; the main process alone writes files (``trajectory.csv``, ``.png``).
    """

    def __init__(
        self,
        controller: StoppingController,
        evaluator: SetEvaluator,
        *,
        output_dir: str | os.PathLike | None = None,
        plot: bool = True,
    ) -> None:
        self.controller, self.evaluator, self.plot = controller, evaluator, plot
        rule = controller.rule
        needed = set(controller.baseline_metrics())
        if rule is not None and not rule.resolved:
            if rule.spec.source != "model":
                raise ValueError(
                    f"the {rule.name} rule's reference values come from another model: measure them "
                    "first (measure_reference with the reference model)"
                )
            needed.update(rule.spec.measured)
        missing = sorted(needed - evaluator.available)
        if missing:
            raise ValueError(
                f"the evaluator cannot compute {missing} on this data; "
                f"available: {sorted(evaluator.available)}"
            )
        csv_path = None if output_dir is None else os.path.join(output_dir, "trajectory.csv")
        self.trajectory = Trajectory(csv_path)
        self.summary: dict[str, Any] = {}
        self._snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        # Seconds of the reference and baseline, of evaluation, and of training (a resumed run's:
        # before this process started, until on_train_begin).
        self._seconds = {"setup_s": 0.0, "eval_s": 0.0, "train_s": 0.0}
        self._train_start: float | None = None
        self._resumed = False

    @staticmethod
    def _losses(logs: Mapping[str, Any]) -> dict[str, float]:
        return {k: logs[k] for k in ("loss", "forget_loss", "retain_loss") if k in logs}

    def _row(self, state, values: Mapping[str, float], seconds: float, **extra: Any) -> None:
        """One trajectory row, with the loss already logged at this step (else :meth:`on_log` adds it)."""
        logged = {}
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            if "loss" in entry:
                logged = self._losses(entry)
                break
        step, epoch = int(state.global_step), float(state.epoch or 0.0)
        self.trajectory.append(
            {"step": step, "epoch": epoch, **values, **logged, **extra, "eval_s": round(seconds, 4)}
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        start = time.perf_counter()
        if not distributed.is_main():  # the main process alone writes the trajectory (csv and png)
            self.trajectory.path = None  # asked now: a launcher's process group may start after __init__
        if self._resumed:  # the baseline and the evaluations up to the checkpoint come from the record
            self.trajectory.write()
        else:
            controller = self.controller
            if controller.rule is not None:
                controller.rule = measure_reference(controller.rule, self.evaluator, model)
            baseline = self.evaluator.evaluate(model, controller.baseline_metrics())
            controller.set_baseline(baseline)
            extra: dict[str, Any] = {}
            if controller.rule is not None:
                extra["satisfied"] = bool(controller.rule.satisfied(baseline))
                if extra["satisfied"] and distributed.is_main():
                    warnings.warn(
                        f"the model satisfies the stopping rule ({controller.rule}) before unlearning: "
                        "training stops at the first evaluation",
                        stacklevel=2,
                    )
            self._seconds["setup_s"] = time.perf_counter() - start
            self._row(state, baseline, self._seconds["setup_s"], **extra)
        # As if training and evaluation had run since _train_start (a resumed run's earlier time included).
        self._train_start = time.perf_counter() - self._seconds["train_s"] - self._seconds["eval_s"]

    def _evaluate(self, state, control, model) -> None:
        history = self.controller.history
        if model is None or (history and history[-1].step == state.global_step):
            return
        start, values = time.perf_counter(), {}
        while todo := self.controller.metrics_to_compute(values):
            values.update(self.evaluator.evaluate(model, todo))
        final = state.global_step >= state.max_steps
        decision = self.controller.record(state.global_step, state.epoch or 0.0, values, final=final)
        if decision.keep_state:
            self._snapshot = (int(state.global_step), _trainable_state(model))
        seconds = time.perf_counter() - start
        self._seconds["eval_s"] += seconds
        extra: dict[str, Any] = {} if self.controller.rule is None else {"satisfied": decision.satisfied}
        if (score := self.controller.history[-1].score) is not None:
            extra["retain_score"] = score
        self._row(state, values, seconds, **extra)
        # The trainer then logs the mean training loss since its previous log, at this very step.
        control.should_log = True
        control.should_training_stop = control.should_training_stop or decision.stop

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The loss the trainer logs after an evaluation (its mean since the previous log) joins its row."""
        last = self.trajectory.rows[-1] if self.trajectory.rows else {}
        if logs and "loss" in logs and last.get("step") == state.global_step and "loss" not in last:
            last.update(self._losses(logs))
            self.trajectory.write()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.controller.every
        if every != "epoch" and (state.global_step % every == 0 or state.global_step >= state.max_steps):
            self._evaluate(state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.controller.every == "epoch":
            self._evaluate(state, control, model)

    def on_save(self, args, state, control, **kwargs):
        """Beside each checkpoint, what :meth:`resume_from` needs: the controller's record, the
        trajectory's rows, the state kept for a restore and the seconds spent so far."""
        if self.controller.stopped is not None or not distributed.is_main():
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        record = {
            "controller": self.controller.state_dict(),
            "trajectory": self.trajectory.rows,
            **self._seconds,
            "train_s": self._train_seconds(),
            "snapshot_step": None if self._snapshot is None else self._snapshot[0],
        }
        if self._snapshot is not None:
            from safetensors.torch import save_file

            atomic_file(os.path.join(folder, SNAPSHOT_FILE), lambda tmp: save_file(self._snapshot[1], tmp))
        write_json(os.path.join(folder, RECORD_FILE), record)

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Continue from the record :meth:`on_save` wrote beside ``checkpoint`` (call before training)."""
        path = os.path.join(os.fspath(checkpoint), RECORD_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"cannot resume: {checkpoint} holds no stopping record ({RECORD_FILE}); the run was "
                "interrupted after it stopped or was started without this rule"
            )
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        self.controller.load_state_dict(record["controller"])
        self.trajectory.rows = [dict(row) for row in record["trajectory"]]
        self._seconds = {key: record[key] for key in self._seconds}
        self._snapshot = None
        if record["snapshot_step"] is not None:
            from safetensors.torch import load_file

            self._snapshot = (record["snapshot_step"], load_file(os.path.join(checkpoint, SNAPSHOT_FILE)))
        self._resumed = True

    def _train_seconds(self) -> float:
        """Seconds training (evaluation excluded), before an interruption included."""
        if self._train_start is None:
            return self._seconds["train_s"]
        return time.perf_counter() - self._train_start - self._seconds["eval_s"]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        train_seconds = self._train_seconds()
        target = self.controller.restore_target
        if target is not None and model is not None:
            if self._snapshot is None or self._snapshot[0] != target.step:
                raise RuntimeError(f"no saved state for step {target.step} to restore")  # a bug, not input
            params = dict(model.named_parameters())
            with torch.no_grad():  # under ZeRO-3 through a gather that DeepSpeed partitions back on exit
                for name, value in self._snapshot[1].items():
                    with gathered([params[name]], modifier_rank=0):
                        params[name].copy_(value.to(params[name].device))
        self._snapshot = None
        summary, rule = self.controller.summary(), self.controller.rule
        plot_path = None
        if self.plot and self.trajectory.path is not None and self.trajectory.rows:
            marks = {
                "rule first holds": summary["first_satisfied_step"],
                "stopped": summary["stopped_step"],
                "kept": summary["kept_step"] if summary["restored"] else None,
            }
            plot_path = self.trajectory.path.removesuffix(".csv") + ".png"
            bounds, title = ((), None) if rule is None else (rule.bounds, str(rule))
            plot_trajectory(self.trajectory.rows, plot_path, bounds=bounds, marks=marks, title=title)
        eval_s = self._seconds["eval_s"]
        self.summary = {
            **summary,
            "eval_items": {name: len(ex) for name, ex in self.evaluator.sets.items()},
            "reference_and_baseline_eval_s": self._seconds["setup_s"],
            "eval_s": eval_s,
            "train_s": train_seconds,
            "eval_fraction": eval_s / train_seconds if train_seconds > 0 else None,
            "trajectory_csv": self.trajectory.path,
            "trajectory_png": plot_path,
        }
