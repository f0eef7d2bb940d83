"""Parsing the stopping options of a run: :func:`parse_stop_rule` and :func:`parse_eval_every`.

Every check happens here, before a model is loaded: the rule's syntax, its metric names, whether each
bound can both hold and fail within its metric's range, the inputs the rule needs (unseen text, a
reference model) and no input it would silently ignore, and whether the run's data can give the
metrics the rule reads. Every error is one ``ValueError`` (``FileNotFoundError`` for a missing input)
naming the problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastunlearn.evaluation.stopping.rules import (
    EL_N,
    METRIC_NAMES,
    OPS,
    Bound,
    ExtractionRule,
    StopRule,
    ThresholdRule,
    TofuRule,
    _kind,
    _number,
    _unknown_metric,
    _why_unavailable,
    available_metrics,
)

__all__ = ["parse_eval_every", "parse_stop_rule"]

# ---------------------------------------------------------------------------------------------------
# Parsing: every check before a model is loaded
# ---------------------------------------------------------------------------------------------------

_RULE_KINDS = ("extraction", "tofu", "threshold")
_BOUND_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([^<>=\s]+)\s*$")
_EXAMPLE = "e.g. forget.prob<=0.05,retain.rougeL>=0.5"


def _check_satisfiable(bound: Bound) -> None:
    """Refuse a bound that holds, or fails, over the metric's whole range: the rule would stop at the
    first evaluation, or never (``forget.prob<=5`` is a percentage given for a probability)."""
    upper = _kind(bound.metric).upper
    at_ends = [bound.holds(0.0), bound.holds(upper)]
    if all(at_ends):
        raise ValueError(
            f"{bound} always holds ({bound.metric} lies in [0, {upper:g}]): the rule would stop at the "
            "first evaluation"
        )
    # A one-sided bound holds on an interval that contains one end of [0, upper] when it is not empty.
    if not any(at_ends):
        raise ValueError(f"{bound} can never hold ({bound.metric} lies in [0, {upper:g}])")


def _parse_bounds(body: str, spec: str) -> ThresholdRule:
    terms = []
    for term in body.split(","):
        match = _BOUND_RE.match(term)
        if match is None:
            raise ValueError(
                f"malformed bound {term.strip()!r} in stopping rule {spec!r}: expected METRIC OP NUMBER "
                f"with OP one of {', '.join(OPS)}, several joined by ',' ({_EXAMPLE})"
            )
        name, op, text = match.groups()
        if name not in METRIC_NAMES:
            raise ValueError(_unknown_metric(name, spec))
        bound = Bound(name, op, _number(text, f"bound {term.strip()!r} in {spec!r}"))
        _check_satisfiable(bound)
        terms.append(bound)
    for name in dict.fromkeys(b.metric for b in terms):
        _check_compatible([b for b in terms if b.metric == name], spec)
    return ThresholdRule(tuple(terms))


def _check_compatible(bounds: list[Bound], spec: str) -> None:
    """Refuse bounds on one metric that exclude each other (``forget.prob>=0.1,forget.prob<=0.05``)."""
    lower = max((b for b in bounds if not b.upper_bound), key=lambda b: (b.value, b.op == ">"), default=None)
    upper = min((b for b in bounds if b.upper_bound), key=lambda b: (b.value, b.op == "<"), default=None)
    if lower is None or upper is None:
        return
    strict = lower.op == ">" or upper.op == "<"
    if lower.value > upper.value or (strict and lower.value == upper.value):
        raise ValueError(f"{lower} and {upper} in stopping rule {spec!r} can never hold together")


def _key_values(body: str, keys: tuple[str, ...], spec: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in body.split(","):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key or not text:
            raise ValueError(
                f"malformed value {item.strip()!r} in stopping rule {spec!r}: expected "
                + ",".join(f"{k}=NUMBER" for k in keys)
            )
        if key not in keys:
            raise ValueError(f"unknown value {key!r} in stopping rule {spec!r}; expected {list(keys)}")
        if key in values:
            raise ValueError(f"{key!r} is given twice in stopping rule {spec!r}")
        values[key] = _number(text, f"{key} in {spec!r}")
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"stopping rule {spec!r} is missing {missing}; give every one of {list(keys)}")
    return values


def _check_unseen(unseen: Any) -> None:
    if isinstance(unseen, (str, os.PathLike)):
        if not os.path.isfile(unseen):
            raise FileNotFoundError(
                f'unseen text file not found: {os.fspath(unseen)} ({{"text"}} JSON Lines)'
            )
    elif not (isinstance(unseen, Sequence) and unseen and all(isinstance(t, str) and t for t in unseen)):
        raise ValueError("unseen must be a JSON Lines file path or a non-empty list of non-empty texts")


def _check_reference_model(reference_model: Any) -> None:
    if isinstance(reference_model, (str, os.PathLike)) and not os.path.isdir(reference_model):
        raise FileNotFoundError(
            f"reference model directory not found: {os.fspath(reference_model)} (the retain-only model, "
            "a local directory)"
        )


def parse_stop_rule(
    spec: str,
    *,
    unseen: str | os.PathLike | Sequence[str] | None = None,
    reference_model: Any = None,
    data: Mapping[str, str] | None = None,
) -> StopRule:
    """Parse and check a stopping rule; every error is one ``ValueError`` (``FileNotFoundError`` for a
    missing input) naming the problem.

    ``spec``:

    - ``"extraction"`` with ``unseen`` (text the model never saw: a ``{"text"}`` JSON Lines path or a
      list of texts), or ``"extraction:ma=0.2994,el10=0.0499"`` (the unseen-text values themselves);
    - ``"tofu"`` with ``reference_model`` (the retain-only model: a local directory or a model object),
      or ``"tofu:acc=0.41,rougeL=0.38"``;
    - bounds on :data:`METRIC_NAMES`, ``"forget.prob<=0.05,retain.rougeL>=0.5"`` (``,`` is AND; an
      optional ``"threshold:"`` prefix), each able both to hold and to fail within the metric's range.

    An input the rule does not use is an error too (it would be silently ignored). ``data`` (set name →
    record format, e.g. ``{"forget": "qa", "retain": "qa"}``) checks that the run's data can give every
    metric the rule reads.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the stopping rule must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, colon, tail = spec.partition(":")
    head, body = head.strip(), tail.strip()
    if head not in _RULE_KINDS:
        if colon or re.fullmatch(r"[A-Za-z_]+", spec):
            raise ValueError(
                f"unknown stopping rule {head!r}; expected 'extraction', 'tofu', or bounds on metrics "
                f"({_EXAMPLE})"
            )
        head, body = "threshold", spec
    if colon and not body:
        raise ValueError(f"nothing after ':' in stopping rule {spec!r}")
    if unseen is not None and head != "extraction":
        raise ValueError(f"unseen text is the extraction rule's input; the {head} rule does not use it")
    if reference_model is not None and head != "tofu":
        raise ValueError(f"a reference model is the tofu rule's input; the {head} rule does not use it")

    rule: StopRule
    if head == "threshold":
        if not body:
            raise ValueError(f"the threshold rule needs bounds, {_EXAMPLE}")
        rule = _parse_bounds(body, spec)
    elif head == "extraction":
        if body and unseen is not None:
            raise ValueError("give the extraction rule's unseen-text values or unseen text, not both")
        if body:
            rule = ExtractionRule(**_key_values(body, ("ma", f"el{EL_N}"), spec))
        elif unseen is None:
            raise ValueError(
                f"the extraction rule compares forget MA and EL{EL_N} with the model's values on text it "
                f"never saw: give that text (--unseen FILE) or the values (extraction:ma=0.2994,"
                f"el{EL_N}=0.0499)"
            )
        else:
            _check_unseen(unseen)
            rule = ExtractionRule(unseen=unseen)
    else:
        if body and reference_model is not None:
            raise ValueError("give the tofu rule's reference values or a reference model, not both")
        if body:
            rule = TofuRule(**_key_values(body, ("acc", "rougeL"), spec))
        elif reference_model is None:
            raise ValueError(
                "the tofu rule compares forget accuracy and ROUGE-L with the retain-only model's: give "
                "that model (--reference-model DIR) or its values (tofu:acc=0.41,rougeL=0.38)"
            )
        else:
            _check_reference_model(reference_model)
            rule = TofuRule(reference_model=reference_model)

    if data is not None:
        available = available_metrics(data)
        for name in rule.metrics:
            if name not in available:
                raise ValueError(f"stopping rule {spec!r}: {_why_unavailable(name, data)}")
    return rule


def parse_eval_every(value: int | str) -> int | Literal["epoch"]:
    """``"epoch"`` or a positive number of optimiser steps (an int or its decimal string)."""
    if value == "epoch":
        return "epoch"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"eval_every must be 'epoch' or a positive number of optimiser steps, got {value!r}")
    return value
