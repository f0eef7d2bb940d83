"""Stopping rules: the metric namespace, bounds, and the rules built from them (pure logic, no torch).

A metric is ``SET.KIND`` (``forget``, ``retain``), a mean over a bounded subset: ``prob``
(``exp(−mean NLL)``), ``acc`` (teacher-forced token accuracy), ``nll``, ``ma`` (memorisation accuracy,
Jang et al. 2023; raw text), ``rougeL`` (ROUGE-L recall of the greedy answer; prompted sets),
``el10`` (extraction likelihood; raw text); ``muse.KIND`` are MUSE's criteria (Shi et al. 2024).
A rule is a conjunction of :class:`Bound` s: ``threshold`` (the user's) or a reference rule
(:data:`REFERENCE_RULES`) whose bounds are a reference's values, given or measured once.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

EL_N = 10  # the n of EL_n (Jang et al. 2023)


class Kind(NamedTuple):
    generates: bool  # needs greedy generation: seconds where a teacher-forced pass takes milliseconds
    needs: str  # "any" record format, a "prompt", raw "text", or a "muse" directory
    upper: float  # values lie in [0, upper]


KINDS: dict[str, Kind] = {
    "prob": Kind(False, "any", 1.0),
    "acc": Kind(False, "any", 1.0),
    "nll": Kind(False, "any", math.inf),
    "ma": Kind(False, "text", 1.0),
    "rougeL": Kind(True, "prompt", 1.0),
    f"el{EL_N}": Kind(True, "text", 1.0),
    "knowmem_forget": Kind(True, "muse", 1.0),  # MUSE C2
    "knowmem_retain": Kind(True, "muse", 1.0),  # MUSE C4
    "verbmem_forget": Kind(True, "muse", 1.0),  # MUSE C1
}


def _names(set_name: str) -> list[str]:
    return [f"{set_name}.{k}" for k, kind in KINDS.items() if (kind.needs == "muse") == (set_name == "muse")]


# Every name a rule may use, in the trajectory's column order.
METRIC_NAMES: tuple[str, ...] = tuple(n for s in ("forget", "retain", "muse") for n in _names(s))
UNSEEN_METRICS = ("unseen.ma", f"unseen.el{EL_N}")
# What each record format gives: generation needs a prompt, MA / EL raw text.
_FORMAT_GIVES = {"qa": "prompt", "prompt_completion": "prompt", "text": "text", "muse": "muse"}
_NEEDS_TEXT = {
    "prompt": "question/answer or prompt/completion records (the greedy answer is scored)",
    "text": 'raw-text ({"text"}) records (the extraction protocol)',
    "muse": "a MUSE directory (--muse DIR)",
}
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def kind_of(name: str) -> Kind:
    return KINDS[name.partition(".")[2]]


def is_generated(name: str) -> bool:
    """Whether metric ``name`` needs greedy generation (``rougeL``, ``el10``, MUSE's)."""
    return kind_of(name).generates


def is_retain(name: str) -> bool:
    """Whether metric ``name`` measures what unlearning must keep (the retain set, MUSE's C4)."""
    return name.startswith("retain.") or name.endswith("_retain")


def available_metrics(data: Mapping[str, str]) -> frozenset[str]:
    """The metric names a run can compute: ``data`` maps each set present (``forget``, ``retain``,
    ``unseen``) to its record format (another value gives ``prob``, ``acc``, ``nll`` only) and ``muse``
    to ``"muse"`` when the run has a MUSE directory."""
    return frozenset(
        n for s, fmt in data.items() for n in _names(s) if kind_of(n).needs in ("any", _FORMAT_GIVES.get(fmt))
    )


def why_unavailable(name: str, data: Mapping[str, str]) -> str:
    set_name, needs = name.partition(".")[0], kind_of(name).needs
    if set_name not in data:
        what = _NEEDS_TEXT["muse"] if needs == "muse" else f"a {set_name} set"
        return f"{name} needs {what}, and this run has none"
    return f"{name} needs {_NEEDS_TEXT[needs]}; the {set_name} set is {data[set_name]!r}"


def unknown_metric(name: str, where: str) -> str:
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


@dataclass(frozen=True)
class Bound:
    """``metric op value`` with ``op`` one of ``<=``, ``<``, ``>=``, ``>``."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(unknown_metric(self.metric, f"{self.metric}{self.op}{self.value}"))
        if self.op not in OPS:
            raise ValueError(f"unknown comparison {self.op!r} in {self}; expected one of {list(OPS)}")
        if not math.isfinite(self.value):
            raise ValueError(f"{self}: the value must be finite")

    @property
    def upper_bound(self) -> bool:
        return self.op in ("<=", "<")

    def holds(self, x: float) -> bool:
        """Whether ``x`` satisfies the bound (``NaN`` never does)."""
        return OPS[self.op](x, self.value)

    def near(self, x: float, margin: float) -> bool:
        """Whether ``x`` satisfies the bound loosened by ``margin · |value|``."""
        slack = margin * abs(self.value)
        return x <= self.value + slack if self.upper_bound else x >= self.value - slack

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


class Reference(NamedTuple):
    """A reference rule: ``metrics`` each ``op`` the value of ``measured`` on ``source`` (``"model"``,
    the model before unlearning, or ``"reference_model"``), given by the option ``input``."""

    metrics: tuple[str, ...]
    op: str
    measured: tuple[str, ...]
    source: str
    input: str
    missing: str  # what to give when neither the input nor the values are

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
class StopRule:
    """A conjunction of bounds: ``threshold`` holds ``terms``; a rule of :data:`REFERENCE_RULES` its
    reference ``values`` (one per metric), ``None`` until measured on ``input``."""

    name: str
    terms: tuple[Bound, ...] = ()
    values: tuple[float, ...] | None = None
    input: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.name == "threshold":
            if not self.terms:
                raise ValueError("a threshold rule needs at least one bound")
            return
        if self.name not in REFERENCE_RULES:
            raise ValueError(f"unknown reference rule {self.name!r}; expected one of {list(REFERENCE_RULES)}")
        ref = self.spec
        if self.values is None:
            return
        for key, value in zip(ref.keys, self.values, strict=True):
            if not 0.0 <= value <= KINDS[key].upper:
                raise ValueError(f"the {self.name} rule's reference {key}={value} must lie in [0, 1]")
        if ref.op == "<" and 0.0 in self.values:
            raise ValueError(
                f"the {self.name} rule stops when {' and '.join(ref.metrics)} are strictly below the "
                f"reference values, and nothing is below 0 ({self.reference}): a model that scores 0 "
                f"there needs a threshold rule instead, e.g. {ref.metrics[0]}<0.3,{ref.metrics[-1]}<=0"
            )

    @property
    def spec(self) -> Reference | None:
        return REFERENCE_RULES.get(self.name)

    @property
    def resolved(self) -> bool:
        return self.spec is None or self.values is not None

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.metric for b in self.terms)) if self.spec is None else self.spec.metrics

    @property
    def reference(self) -> dict[str, float] | None:
        """The values by key (``{"acc": 0.41, "rougeL": 0.38}``), ``None`` until measured."""
        return None if self.values is None else dict(zip(self.spec.keys, self.values))

    def with_reference(self, values: Mapping[str, float]) -> StopRule:
        """The rule resolved with the measured ``values`` of its reference's ``measured`` metrics."""
        if self.spec is None:
            raise ValueError(f"the {self.name} rule has no reference to measure")
        missing = [m for m in self.spec.measured if m not in values]
        if missing:
            raise ValueError(f"the {self.name} rule's reference needs {missing}")
        return replace(self, values=tuple(float(values[m]) for m in self.spec.measured))

    @property
    def bounds(self) -> tuple[Bound, ...]:
        if self.spec is None:
            return self.terms
        if self.values is None:
            raise ValueError(f"the {self.name} rule's reference values are not measured yet")
        return tuple(Bound(m, self.spec.op, v) for m, v in zip(self.spec.metrics, self.values))

    def satisfied(self, values: Mapping[str, float]) -> bool | None:
        """``True`` when every bound holds, ``False`` as soon as one computed metric fails, ``None``
        when none fails but some are missing (undecided: never read as satisfied)."""
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
