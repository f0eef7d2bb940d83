"""Stopping rules: the metric namespace, bounds, and the rules built from them (issue 14).

Pure logic, no torch: a rule is checked (names, bounds, whether the data can give the metrics it
needs) before any model is loaded. Parsing a rule from text is :mod:`.parsing`'s; the decision state
machine is :mod:`.controller`'s; the evaluation itself (metrics on bounded subsets inside a
``Trainer``) is :mod:`fastunlearn.evaluation.stop_callback`'s.

Metric namespace
----------------
``SET.KIND`` with SET ``forget`` or ``retain`` and KIND one of :data:`KINDS`, each the mean over a
bounded subset of the set's examples (SPEC §4 definitions, :mod:`fastunlearn.evaluation.metrics`):

- ``prob``: length-normalised probability ``P̄ = exp(−mean NLL of the labelled tokens)``, mean over
  examples; ``acc``: teacher-forced next-token accuracy, correct / labelled tokens pooled over the
  subset; ``nll``: mean over examples of the per-token NLL. One teacher-forced pass gives all three.
- ``ma``: memorisation accuracy (Jang et al. 2023, Eq. 2), per-sequence teacher-forced accuracy,
  averaged — raw-text (``{"text"}``) sets only, the extraction protocol.
- ``rougeL``: ROUGE-L recall of the greedy answer against the reference answer — sets with a prompt
  (``qa`` / ``prompt_completion`` records). Needs generation.
- ``el10``: extraction likelihood EL₁₀ (Jang et al. 2023, Eq. 1) — raw-text sets. Needs generation.

``unseen.ma`` / ``unseen.el10`` are the same metrics on text the model never saw: the extraction rule's
reference, measured once, not a stopping criterion. The training loss is written to the trajectory
but is not a metric here: the trainer logs it after the step's evaluation, as a mean since its previous
log, so a rule could not be decided on it at an evaluation.

Rules (all a conjunction of :class:`Bound` s once their reference values are known)
------------------------------------------------------------------------------------
- :class:`ExtractionRule` (SPEC §4, the paper's): ``forget.ma < MA_unseen`` **and**
  ``forget.el10 < EL10_unseen``, the model's own values on unseen text (measured before training) or
  given numbers (published GPT-Neo-125M: 0.2994 and 0.0499).
- :class:`TofuRule`: ``forget.acc <= acc_ref`` and ``forget.rougeL <= rougeL_ref``, the retain-only
  model's values on the same forget subset (measured once from the reference model) or given numbers.
- :class:`ThresholdRule`: user bounds, e.g. ``forget.prob<=0.05,retain.rougeL>=0.5`` (``,`` is AND).
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

__all__ = [
    "EL_N",
    "KINDS",
    "METRIC_NAMES",
    "OPS",
    "UNSEEN_METRICS",
    "Bound",
    "ExtractionRule",
    "Kind",
    "StopRule",
    "ThresholdRule",
    "TofuRule",
    "available_metrics",
    "is_generated",
    "metric_help",
]

EL_N = 10  # the n of EL_n in the namespace (SPEC §4: n = 10)


@dataclass(frozen=True)
class Kind:
    """One kind of metric: whether it needs generation, what records it needs, its range."""

    description: str
    generates: bool  # greedy generation: seconds where a teacher-forced pass takes milliseconds
    needs: Literal["any", "prompt", "text"]
    upper: float  # values lie in [0, upper]


KINDS: dict[str, Kind] = {
    "prob": Kind("mean length-normalised probability of the labelled tokens", False, "any", 1.0),
    "acc": Kind("teacher-forced next-token accuracy of the labelled tokens", False, "any", 1.0),
    "nll": Kind("mean per-token negative log-likelihood of the labelled tokens", False, "any", math.inf),
    "ma": Kind("memorisation accuracy (raw-text sets)", False, "text", 1.0),
    "rougeL": Kind("ROUGE-L recall of the greedy answer (question/answer sets)", True, "prompt", 1.0),
    f"el{EL_N}": Kind(f"extraction likelihood EL_{EL_N} (raw-text sets)", True, "text", 1.0),
}
RULE_SETS = ("forget", "retain")
# Every name a rule may use, in the trajectory's column order.
METRIC_NAMES: tuple[str, ...] = tuple(f"{s}.{k}" for s in RULE_SETS for k in KINDS)
UNSEEN_METRICS = ("unseen.ma", f"unseen.el{EL_N}")
# Record formats (fastunlearn.data.examples) and what they give: generation needs a prompt, MA/EL text.
_FORMAT_GIVES = {"qa": "prompt", "prompt_completion": "prompt", "text": "text"}
_NEEDS_TEXT = {
    "prompt": "question/answer or prompt/completion records (the greedy answer is scored)",
    "text": 'raw-text ({"text"}) records (the extraction protocol)',
}

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


def _kind(name: str) -> Kind:
    return KINDS[name.partition(".")[2]]


def metric_help() -> str:
    """One line per metric kind, for command-line help."""
    return "; ".join(f"{k}: {kind.description}" for k, kind in KINDS.items())


def is_generated(name: str) -> bool:
    """Whether metric ``name`` needs greedy generation (``rougeL``, ``el10``): the expensive ones."""
    return _kind(name).generates


def available_metrics(data: Mapping[str, str]) -> frozenset[str]:
    """The metric names a run can compute, from the record format of each set it has.

    ``data`` maps ``forget`` / ``retain`` / ``unseen`` to ``"qa"``, ``"prompt_completion"`` or
    ``"text"``; a set that is absent is not there. Any other format value gives only the metrics that
    every record format gives (``prob``, ``acc``, ``nll``).
    """
    out = set()
    for set_name, fmt in data.items():
        gives = _FORMAT_GIVES.get(fmt)
        out.update(f"{set_name}.{k}" for k, kind in KINDS.items() if kind.needs in ("any", gives))
    return frozenset(out)


def _why_unavailable(name: str, data: Mapping[str, str]) -> str:
    set_name = name.partition(".")[0]
    if set_name not in data:
        return f"{name} needs a {set_name} set, and this run has none"
    return f"{name} needs {_NEEDS_TEXT[_kind(name).needs]}; the {set_name} set is {data[set_name]!r}"


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: the value must be finite, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------
# Bounds and rules
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """``metric op value`` with ``op`` one of ``<=``, ``<``, ``>=``, ``>``."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(_unknown_metric(self.metric, f"{self.metric}{self.op}{self.value}"))
        if self.op not in OPS:
            raise ValueError(f"unknown comparison {self.op!r} in {self}; expected one of {list(OPS)}")
        if not math.isfinite(self.value):
            raise ValueError(f"{self}: the value must be finite")

    @property
    def upper_bound(self) -> bool:
        """True for ``<=`` / ``<`` (the metric must come down to the value)."""
        return self.op in ("<=", "<")

    def holds(self, x: float) -> bool:
        """Whether ``x`` satisfies the bound (``NaN`` never does)."""
        return OPS[self.op](x, self.value)

    def near(self, x: float, margin: float) -> bool:
        """Whether ``x`` satisfies the bound loosened by ``margin · |value|``: ``x ≤ value·(1 + margin)``
        for an upper bound (``value ≥ 0`` here), ``x ≥ value·(1 − margin)`` for a lower one."""
        slack = margin * abs(self.value)
        return x <= self.value + slack if self.upper_bound else x >= self.value - slack

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


class StopRule:
    """A stopping rule: a conjunction of :class:`Bound` s, once its reference values are known.

    ``metrics`` are the names the rule reads; ``reference_metrics`` what must be measured to resolve it
    (empty when resolved) and ``reference_source`` on what: ``"model"`` (the model being unlearned,
    before training: the extraction rule's unseen text) or ``"reference_model"`` (the retain-only
    model: the TOFU rule). :meth:`with_reference` returns the resolved rule.
    """

    name: ClassVar[str]
    reference_source: ClassVar[str | None] = None

    @property
    def metrics(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def resolved(self) -> bool:
        return True

    @property
    def reference_metrics(self) -> tuple[str, ...]:
        return ()

    def with_reference(self, values: Mapping[str, float]) -> StopRule:
        raise ValueError(f"the {self.name} rule has no reference to measure")

    @property
    def bounds(self) -> tuple[Bound, ...]:
        raise NotImplementedError

    def satisfied(self, values: Mapping[str, float]) -> bool | None:
        """``True`` when every bound holds, ``False`` as soon as one computed metric fails, ``None``
        when no computed metric fails but some are missing (undecided: never read as satisfied)."""
        missing = False
        for bound in self.bounds:
            if bound.metric not in values:
                missing = True
            elif not bound.holds(values[bound.metric]):
                return False
        return None if missing else True

    def __str__(self) -> str:
        if not self.resolved:
            return f"{self.name} (reference values not measured yet)"
        return f"{self.name}: " + " and ".join(str(b) for b in self.bounds)


@dataclass(frozen=True)
class ThresholdRule(StopRule):
    """User bounds on evaluated metrics, all of which must hold."""

    name: ClassVar[str] = "threshold"
    terms: tuple[Bound, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a threshold rule needs at least one bound")

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.metric for b in self.terms))

    @property
    def bounds(self) -> tuple[Bound, ...]:
        return self.terms


def _check_rate(value: float | None, what: str) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must lie in [0, 1], got {value}")


def _both_or_neither(a: float | None, b: float | None, names: str) -> None:
    if (a is None) != (b is None):
        raise ValueError(f"give both {names}, or neither")


@dataclass(frozen=True)
class ExtractionRule(StopRule):
    """SPEC §4 / Jang et al. 2023: stop once forget MA **and** forget EL₁₀ are both below the model's
    values on unseen text (strictly: ``<``). ``ma`` / ``el10`` given, or ``None`` until measured on
    ``unseen`` (a ``{"text"}`` JSON Lines path or a list of texts) with the model before unlearning."""

    name: ClassVar[str] = "extraction"
    reference_source: ClassVar[str | None] = "model"
    ma: float | None = None
    el10: float | None = None
    unseen: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _both_or_neither(self.ma, self.el10, "ma and el10")
        _check_rate(self.ma, "the unseen-text MA")
        _check_rate(self.el10, f"the unseen-text EL{EL_N}")
        if self.ma == 0.0 or self.el10 == 0.0:
            raise ValueError(
                f"the extraction rule stops when forget MA and EL{EL_N} are strictly below the unseen-text "
                f"values, and nothing is below 0 (ma={self.ma}, el{EL_N}={self.el10}): a model that "
                "never extracts unseen text needs a threshold rule instead, e.g. "
                f"forget.ma<0.3,forget.el{EL_N}<=0"
            )

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("forget.ma", f"forget.el{EL_N}")

    @property
    def resolved(self) -> bool:
        return self.ma is not None

    @property
    def reference_metrics(self) -> tuple[str, ...]:
        return () if self.resolved else UNSEEN_METRICS

    def with_reference(self, values: Mapping[str, float]) -> ExtractionRule:
        return replace(self, ma=float(values["unseen.ma"]), el10=float(values[f"unseen.el{EL_N}"]))

    @property
    def bounds(self) -> tuple[Bound, ...]:
        if not self.resolved:
            raise ValueError("the extraction rule's unseen-text values are not measured yet")
        return (Bound("forget.ma", "<", self.ma), Bound(f"forget.el{EL_N}", "<", self.el10))


@dataclass(frozen=True)
class TofuRule(StopRule):
    """Stop once forget accuracy and forget ROUGE-L are at or below the retain-only model's values on the
    same forget subset (that model never saw the forget set: matching it is what "forgotten" can mean).
    ``acc`` / ``rougeL`` given, or ``None`` until measured on ``reference_model``."""

    name: ClassVar[str] = "tofu"
    reference_source: ClassVar[str | None] = "reference_model"
    acc: float | None = None
    rougeL: float | None = None
    reference_model: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _both_or_neither(self.acc, self.rougeL, "acc and rougeL")
        _check_rate(self.acc, "the reference forget accuracy")
        _check_rate(self.rougeL, "the reference forget ROUGE-L")

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("forget.acc", "forget.rougeL")

    @property
    def resolved(self) -> bool:
        return self.acc is not None

    @property
    def reference_metrics(self) -> tuple[str, ...]:
        return () if self.resolved else self.metrics

    def with_reference(self, values: Mapping[str, float]) -> TofuRule:
        return replace(self, acc=float(values["forget.acc"]), rougeL=float(values["forget.rougeL"]))

    @property
    def bounds(self) -> tuple[Bound, ...]:
        if not self.resolved:
            raise ValueError("the tofu rule's reference values are not measured yet")
        return (Bound("forget.acc", "<=", self.acc), Bound("forget.rougeL", "<=", self.rougeL))


def _unknown_metric(name: str, where: str) -> str:
    if name == "loss" or name.endswith("_loss"):
        return (
            f"{name!r} in {where!r} is the training loss: it is written to the trajectory, but it is "
            "logged by the trainer, not evaluated, so a rule cannot stop on it; use an evaluated "
            f"metric: {', '.join(METRIC_NAMES)}"
        )
    if name.startswith("unseen."):
        return (
            f"{name!r} in {where!r}: unseen-text values are the extraction rule's reference; use the "
            "'extraction' rule with unseen text (--unseen FILE) instead"
        )
    close = difflib.get_close_matches(name, METRIC_NAMES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown metric {name!r} in {where!r}{hint}; known metrics: {', '.join(METRIC_NAMES)}"
