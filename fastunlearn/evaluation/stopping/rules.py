"""Stopping rules: the metric namespace, bounds, and the rules built from them.

Pure logic, no torch: a rule is checked (names, bounds, whether the data can give the metrics it
needs) before any model is loaded. Parsing a rule from text is :mod:`.parsing`'s; the decision state
machine :mod:`.controller`'s; the evaluation itself :mod:`fastunlearn.evaluation.sets`'.

Metric namespace
----------------
``SET.KIND``, each the mean over a bounded subset of the set's examples (SET ``forget`` or
``retain``, the run's data):

- ``prob``: length-normalised probability ``P̄ = exp(−mean NLL of the labelled tokens)``, mean over
  examples; ``acc``: teacher-forced next-token accuracy, correct / labelled tokens pooled over the
  subset; ``nll``: mean over examples of the per-token NLL. One teacher-forced pass gives all three.
- ``ma``: memorisation accuracy (Jang et al. 2023, arXiv:2210.01504), per-sequence teacher-forced
  accuracy, averaged — raw-text sets only.
- ``rougeL``: ROUGE-L recall of the greedy answer against the reference answer — sets with a prompt
  (``qa`` / ``prompt_completion`` records). Needs generation.
- ``el10``: extraction likelihood EL₁₀ (Jang et al. 2023) — raw-text sets. Needs generation.

``muse.KIND`` are MUSE's criteria (Shi et al. 2024, arXiv:2407.06460) on a benchmark directory:
``knowmem_forget`` (C2), ``knowmem_retain`` (C4) and ``verbmem_forget`` (C1), ROUGE-L F1 of greedy
answers. ``unseen.ma`` / ``unseen.el10`` are the extraction rule's reference, not a criterion. The
training loss is written to the trajectory but is not a metric here: the trainer logs it after the
step's evaluation, so a rule could not be decided on it.

Rules (a conjunction of :class:`Bound` s once their reference values are known)
-------------------------------------------------------------------------------
- ``threshold`` (:class:`ThresholdRule`): user bounds, ``forget.prob<=0.05,retain.rougeL>=0.5``.
- :data:`REFERENCE_RULES` (:class:`ReferenceRule`): fixed metrics bounded by a reference's values,
  given as numbers or measured once. ``extraction`` (Jang et al. 2023): forget MA **and** EL₁₀ below
  the model's own values on unseen text, measured before training (published GPT-Neo-125M: 0.2994
  and 0.0499). ``tofu``: forget accuracy and ROUGE-L at or below the retain-only model's on the same
  forget subset. ``muse`` (Shi et al. 2024): forget KnowMem at or below the retrained model's.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

__all__ = [
    "EL_N",
    "KINDS",
    "METRIC_NAMES",
    "OPS",
    "REFERENCE_RULES",
    "UNSEEN_METRICS",
    "Bound",
    "Kind",
    "ReferenceRule",
    "StopRule",
    "ThresholdRule",
    "available_metrics",
    "is_generated",
    "is_retain",
]

EL_N = 10  # the n of EL_n in the namespace (n = 10, Jang et al. 2023)


@dataclass(frozen=True)
class Kind:
    """One kind of metric: whether it needs generation, what data gives it, its range."""

    description: str
    generates: bool  # greedy generation: seconds where a teacher-forced pass takes milliseconds
    needs: str  # "any" record format, a "prompt", raw "text", or a "muse" directory
    upper: float  # values lie in [0, upper]


_MUSE = "MUSE {}: ROUGE-L F1 of the greedy answers to {}"
KINDS: dict[str, Kind] = {
    "prob": Kind("mean length-normalised probability of the labelled tokens", False, "any", 1.0),
    "acc": Kind("teacher-forced next-token accuracy of the labelled tokens", False, "any", 1.0),
    "nll": Kind("mean per-token negative log-likelihood of the labelled tokens", False, "any", math.inf),
    "ma": Kind("memorisation accuracy (raw-text sets)", False, "text", 1.0),
    "rougeL": Kind("ROUGE-L recall of the greedy answer (question/answer sets)", True, "prompt", 1.0),
    f"el{EL_N}": Kind(f"extraction likelihood EL_{EL_N} (raw-text sets)", True, "text", 1.0),
    "knowmem_forget": Kind(_MUSE.format("C2", "knowmem/forget_qa"), True, "muse", 1.0),
    "knowmem_retain": Kind(_MUSE.format("C4", "knowmem/retain_qa"), True, "muse", 1.0),
    "verbmem_forget": Kind(_MUSE.format("C1", "the verbmem/forget prompts"), True, "muse", 1.0),
}


def _names(set_name: str) -> list[str]:
    """The metric names of a set: MUSE's kinds on ``muse``, the others on a data set."""
    return [f"{set_name}.{k}" for k, kind in KINDS.items() if (kind.needs == "muse") == (set_name == "muse")]


# Every name a rule may use, in the trajectory's column order.
METRIC_NAMES: tuple[str, ...] = tuple(n for s in ("forget", "retain", "muse") for n in _names(s))
UNSEEN_METRICS = ("unseen.ma", f"unseen.el{EL_N}")
# Record formats (fastunlearn.data.examples) and what they give: generation needs a prompt, MA/EL text.
_FORMAT_GIVES = {"qa": "prompt", "prompt_completion": "prompt", "text": "text", "muse": "muse"}
_NEEDS_TEXT = {
    "prompt": "question/answer or prompt/completion records (the greedy answer is scored)",
    "text": 'raw-text ({"text"}) records (the extraction protocol)',
    "muse": "a MUSE directory (--muse DIR)",
}

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


def _kind(name: str) -> Kind:
    return KINDS[name.partition(".")[2]]


def is_generated(name: str) -> bool:
    """Whether metric ``name`` needs greedy generation (``rougeL``, ``el10``, MUSE's): the expensive ones."""
    return _kind(name).generates


def is_retain(name: str) -> bool:
    """Whether metric ``name`` measures what unlearning must keep (the retain set, MUSE's C4)."""
    return name.startswith("retain.") or name.endswith("_retain")


def available_metrics(data: Mapping[str, str]) -> frozenset[str]:
    """The metric names a run can compute, from what each of its sets is.

    ``data`` maps ``forget`` / ``retain`` / ``unseen`` to a record format (``"qa"``,
    ``"prompt_completion"``, ``"text"``; any other value gives only ``prob``, ``acc``, ``nll``) and
    ``muse`` to ``"muse"`` when the run has a MUSE directory; an absent set is not there.
    """
    out = set()
    for set_name, fmt in data.items():
        gives = _FORMAT_GIVES.get(fmt)
        out.update(n for n in _names(set_name) if _kind(n).needs in ("any", gives))
    return frozenset(out)


def _why_unavailable(name: str, data: Mapping[str, str]) -> str:
    set_name, needs = name.partition(".")[0], _kind(name).needs
    if set_name not in data:
        what = _NEEDS_TEXT["muse"] if needs == "muse" else f"a {set_name} set"
        return f"{name} needs {what}, and this run has none"
    return f"{name} needs {_NEEDS_TEXT[needs]}; the {set_name} set is {data[set_name]!r}"


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: the value must be finite, got {text!r}")
    return value


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
    """A stopping rule: a conjunction of :class:`Bound` s once its reference values are known.

    ``metrics``: the names the rule reads; ``reference_metrics``: what must be measured to resolve it
    (empty when resolved), on ``reference_source``: ``"model"`` (the model being unlearned, before
    training) or ``"reference_model"`` (another model); :meth:`with_reference` returns it resolved.
    """

    name: ClassVar[str]
    resolved: bool = True
    reference_source: str | None = None
    reference_metrics: tuple[str, ...] = ()

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.metric for b in self.bounds))

    @property
    def bounds(self) -> tuple[Bound, ...]:
        raise NotImplementedError

    def with_reference(self, values: Mapping[str, float]) -> StopRule:
        raise ValueError(f"the {self.name} rule has no reference to measure")

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
    def bounds(self) -> tuple[Bound, ...]:
        return self.terms


@dataclass(frozen=True)
class Reference:
    """What a reference rule bounds and where its values come from: ``metrics`` each ``op`` the value
    of ``measured`` (same order) on ``source`` — ``"model"``, the model before unlearning, or
    ``"reference_model"`` — given by the option ``input``; ``missing`` says what to give."""

    metrics: tuple[str, ...]
    op: str
    measured: tuple[str, ...]
    source: str
    input: str
    missing: str

    @property
    def keys(self) -> tuple[str, ...]:
        """The names of the values in ``NAME:key=value,...``: the metrics' kinds."""
        return tuple(m.partition(".")[2] for m in self.metrics)


REFERENCE_RULES: dict[str, Reference] = {
    "extraction": Reference(
        ("forget.ma", f"forget.el{EL_N}"), "<", UNSEEN_METRICS, "model", "unseen",
        f"the extraction rule compares forget MA and EL{EL_N} with the model's values on text it never "
        f"saw: give that text (--unseen FILE) or the values (extraction:ma=0.2994,el{EL_N}=0.0499)",
    ),
    "tofu": Reference(
        ("forget.acc", "forget.rougeL"), "<=", ("forget.acc", "forget.rougeL"), "reference_model",
        "reference_model",
        "the tofu rule compares forget accuracy and ROUGE-L with the retain-only model's: give that model "
        "(--reference-model DIR) or its values (tofu:acc=0.41,rougeL=0.38)",
    ),
    "muse": Reference(
        ("muse.knowmem_forget",), "<=", ("muse.knowmem_forget",), "reference_model", "retrain_model",
        "the muse rule compares forget KnowMem with the retrained model's (MUSE, Shi et al. 2024): give "
        "that model (--retrain-model DIR) or its value (muse:knowmem_forget=0.3)",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ReferenceRule(StopRule):
    """A rule of :data:`REFERENCE_RULES`: ``values`` (one per metric) given, or ``None`` until measured
    on ``input`` (unseen text, or the reference model)."""

    name: str
    values: tuple[float, ...] | None = None
    input: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.name not in REFERENCE_RULES:
            raise ValueError(f"unknown reference rule {self.name!r}; expected one of {list(REFERENCE_RULES)}")
        if self.values is None:
            return
        ref = self.spec
        for key, value in zip(ref.keys, self.values, strict=True):
            upper = KINDS[key].upper
            if not 0.0 <= value <= upper:
                raise ValueError(f"the {self.name} rule's reference {key}={value} must lie in [0, {upper:g}]")
        if ref.op == "<" and 0.0 in self.values:
            raise ValueError(
                f"the {self.name} rule stops when {' and '.join(ref.metrics)} are strictly below the "
                f"reference values, and nothing is below 0 ({self.reference}): a model that scores 0 "
                f"there needs a threshold rule instead, e.g. {ref.metrics[0]}<0.3,{ref.metrics[-1]}<=0"
            )

    @property
    def spec(self) -> Reference:
        return REFERENCE_RULES[self.name]

    @property
    def resolved(self) -> bool:  # type: ignore[override]
        return self.values is not None

    @property
    def reference_source(self) -> str:  # type: ignore[override]
        return self.spec.source

    @property
    def reference_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.resolved else self.spec.measured

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.spec.metrics

    @property
    def reference(self) -> dict[str, float] | None:
        """The values by key (``{"acc": 0.41, "rougeL": 0.38}``), ``None`` until measured."""
        return None if self.values is None else dict(zip(self.spec.keys, self.values))

    def with_reference(self, values: Mapping[str, float]) -> ReferenceRule:
        return replace(self, values=tuple(float(values[m]) for m in self.spec.measured))

    @property
    def bounds(self) -> tuple[Bound, ...]:
        if self.values is None:
            raise ValueError(f"the {self.name} rule's reference values are not measured yet")
        return tuple(Bound(m, self.spec.op, v) for m, v in zip(self.spec.metrics, self.values))


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
