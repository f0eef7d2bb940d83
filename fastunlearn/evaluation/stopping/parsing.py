"""The stopping options of a run checked at once, before a model loads (:func:`plan_stopping`): the
rule's syntax, bounds that can both hold and fail, a reference rule's input, and metrics the run's data
can give. Every error is one ``ValueError`` (``FileNotFoundError`` for a missing input)."""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastunlearn.evaluation.stopping.controller import DEFAULT_RETAIN_METRICS, StoppingController
from fastunlearn.evaluation.stopping.rules import (
    METRIC_NAMES,
    OPS,
    REFERENCE_RULES,
    Bound,
    StopRule,
    available_metrics,
    is_generated,
    is_retain,
    kind_of,
    unknown_metric,
    why_unavailable,
)

_BOUND_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>)\s*([^<>=\s]+)\s*$")
_EXAMPLE = "e.g. forget.prob<=0.05,retain.rougeL>=0.5"
# Each reference rule's input as errors name it, and for a model what it is.
_INPUTS = {
    "unseen": ("unseen text", ""),
    "reference_model": ("reference model", "the retain-only model"),
    "retrain_model": ("retrained model", "the model trained without the forget set"),
}


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: the value must be finite, got {text!r}")
    return value


def _check_satisfiable(bound: Bound) -> None:
    """Refuse a bound that holds, or fails, over the metric's whole range ``[0, upper]``: the rule would
    stop at the first evaluation, or never (``forget.prob<=5`` is a percentage given for a
    probability). A one-sided bound holds on an interval holding one end of the range, if any."""
    upper = kind_of(bound.metric).upper
    at_ends = [bound.holds(0.0), bound.holds(upper)]
    if all(at_ends):
        raise ValueError(
            f"{bound} always holds ({bound.metric} lies in [0, {upper:g}]): the rule would stop at the "
            "first evaluation"
        )
    if not any(at_ends):
        raise ValueError(f"{bound} can never hold ({bound.metric} lies in [0, {upper:g}])")


def _check_compatible(bounds: list[Bound], spec: str) -> None:
    """Refuse bounds on one metric that exclude each other (``forget.prob>=0.1,forget.prob<=0.05``)."""
    lower = max((b for b in bounds if not b.upper_bound), key=lambda b: (b.value, b.op == ">"), default=None)
    upper = min((b for b in bounds if b.upper_bound), key=lambda b: (b.value, b.op == "<"), default=None)
    if lower is None or upper is None:
        return
    strict = lower.op == ">" or upper.op == "<"
    if lower.value > upper.value or (strict and lower.value == upper.value):
        raise ValueError(f"{lower} and {upper} in stopping rule {spec!r} can never hold together")


def _parse_bounds(body: str, spec: str) -> StopRule:
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
            raise ValueError(unknown_metric(name, spec))
        terms.append(Bound(name, op, _number(text, f"bound {term.strip()!r} in {spec!r}")))
        _check_satisfiable(terms[-1])
    for name in dict.fromkeys(b.metric for b in terms):
        _check_compatible([b for b in terms if b.metric == name], spec)
    return StopRule("threshold", tuple(terms))


def _key_values(body: str, keys: tuple[str, ...], spec: str) -> tuple[float, ...]:
    """``key=NUMBER,...`` with every one of ``keys`` exactly once, in ``keys``' order."""
    values: dict[str, float] = {}
    for item in body.split(","):
        key, eq, text = (part.strip() for part in item.partition("="))
        if not eq or not key or not text:
            expected = ",".join(f"{k}=NUMBER" for k in keys)
            raise ValueError(
                f"malformed value {item.strip()!r} in stopping rule {spec!r}: expected {expected}"
            )
        if key not in keys:
            raise ValueError(f"unknown value {key!r} in stopping rule {spec!r}; expected {list(keys)}")
        if key in values:
            raise ValueError(f"{key!r} is given twice in stopping rule {spec!r}")
        values[key] = _number(text, f"{key} in {spec!r}")
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"stopping rule {spec!r} is missing {missing}; give every one of {list(keys)}")
    return tuple(values[k] for k in keys)


def _check_input(name: str, value: Any) -> None:
    """Unseen text: a file that exists or a non-empty list of texts; a model: a directory that exists
    (or a model object)."""
    path = isinstance(value, (str, os.PathLike))
    if name == "unseen" and path and not os.path.isfile(value):
        raise FileNotFoundError(f'unseen text file not found: {os.fspath(value)} ({{"text"}} JSON Lines)')
    texts = isinstance(value, Sequence) and value and all(isinstance(t, str) and t for t in value)
    if name == "unseen" and not path and not texts:
        raise ValueError("unseen must be a JSON Lines file path or a non-empty list of non-empty texts")
    if name != "unseen" and path and not os.path.isdir(value):
        what, meaning = _INPUTS[name]
        raise FileNotFoundError(
            f"{what} directory not found: {os.fspath(value)} ({meaning}, a local directory)"
        )


def _head_and_body(spec: Any) -> tuple[str, str]:
    """The rule's name (``threshold`` for bare bounds) and what follows its ``:``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"the stopping rule must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, colon, tail = (part.strip() for part in spec.partition(":"))
    if head not in (*REFERENCE_RULES, "threshold"):
        if colon or re.fullmatch(r"[A-Za-z_]+", spec):
            names = ", ".join(repr(n) for n in REFERENCE_RULES)
            raise ValueError(
                f"unknown stopping rule {head!r}; expected {names}, or bounds on metrics ({_EXAMPLE})"
            )
        head, tail = "threshold", spec
    if colon and not tail:
        raise ValueError(f"nothing after ':' in stopping rule {spec!r}")
    if head == "threshold" and not tail:
        raise ValueError(f"the threshold rule needs bounds, {_EXAMPLE}")
    return head, tail


def parse_stop_rule(
    spec: str,
    *,
    unseen: str | os.PathLike | Sequence[str] | None = None,
    reference_model: Any = None,
    retrain_model: Any = None,
    data: Mapping[str, str] | None = None,
) -> StopRule:
    """Parse and check a stopping rule.

    ``spec``: bounds joined by ``,`` (AND), ``"forget.prob<=0.05,retain.rougeL>=0.5"`` (optionally
    ``"threshold:"``-prefixed), or a reference rule with its input or values: ``"extraction"`` with
    ``unseen`` texts (a file or a list) or ``"extraction:ma=0.3,el10=0.05"``; ``"tofu"`` with
    ``reference_model`` or ``"tofu:acc=0.41,rougeL=0.38"``; ``"muse"`` with ``retrain_model`` or
    ``"muse:knowmem_forget=0.3"``. An unused input is an error; ``data`` (set → record format) checks
    that the run can give every metric.
    """
    inputs = {"unseen": unseen, "reference_model": reference_model, "retrain_model": retrain_model}
    head, body = _head_and_body(spec)
    ref = REFERENCE_RULES.get(head)
    for key, value in inputs.items():
        if value is not None and (ref is None or ref.input != key):
            owner = next(n for n, r in REFERENCE_RULES.items() if r.input == key)
            raise ValueError(
                f"the {_INPUTS[key][0]} is the {owner} rule's input; the {head} rule does not use it"
            )
    if ref is None:
        rule = _parse_bounds(body, spec.strip())
    elif body and inputs[ref.input] is not None:
        raise ValueError(f"give the {head} rule's reference values or the {_INPUTS[ref.input][0]}, not both")
    elif body:
        rule = StopRule(head, values=_key_values(body, ref.keys, spec.strip()))
    elif inputs[ref.input] is None:
        raise ValueError(ref.missing)
    else:
        _check_input(ref.input, inputs[ref.input])
        rule = StopRule(head, input=inputs[ref.input])
    for name in rule.metrics if data is not None else ():
        if name not in available_metrics(data):
            raise ValueError(f"stopping rule {spec.strip()!r}: {why_unavailable(name, data)}")
    return rule


def plan_stopping(
    stop: str | None = None,
    *,
    eval_every: int | str | None = None,
    patience: int = 0,
    restore: str = "first",
    generate_within: float = 0.0,
    best_by: str | Sequence[str] | None = None,
    unseen: str | os.PathLike | Sequence[str] | None = None,
    reference_model: Any = None,
    retrain_model: Any = None,
    data: Mapping[str, str],
) -> StoppingController | None:
    """Check every stopping option of a run before anything loads and make its controller; ``None``
    when nothing is evaluated during training (no rule, no ``eval_every``). Without a rule
    ``eval_every`` alone records a trajectory; the retrained model is also PrivLeak's, so only a bare
    ``"muse"`` rule takes it. ``best_by``: the retain metrics ranking ``restore="best"``'s states
    (default :data:`DEFAULT_RETAIN_METRICS` the data can give); ``data``: set name → record format.
    """
    options = {"patience": patience, "restore": restore, "generate_within": generate_within}
    if stop is None:
        inputs = {**options, "best_by": best_by, "unseen": unseen, "reference_model": reference_model}
        defaults = inspect.signature(plan_stopping).parameters
        given = [name for name, value in inputs.items() if value != defaults[name].default]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) a stopping rule (stop=... / --stop-when)")
        if eval_every is None:
            return None
        rule = None
    else:
        retrain = retrain_model if isinstance(stop, str) and stop.strip() == "muse" else None
        rule = parse_stop_rule(
            stop, unseen=unseen, reference_model=reference_model, retrain_model=retrain, data=data
        )
    available = available_metrics(data)
    if best_by is None:
        retain_metrics = tuple(m for m in DEFAULT_RETAIN_METRICS if m in available)
    else:
        retain_metrics = _best_by(best_by, restore, data)
    track = tuple(m for m in METRIC_NAMES if m in available and not is_generated(m))
    every = "epoch" if eval_every is None else eval_every
    return StoppingController(rule, every=every, retain_metrics=retain_metrics, track=track, **options)


# The options of a run that plan_stopping reads, by the names UnlearnConfig gives them.
PLAN_OPTIONS = tuple(name for name in inspect.signature(plan_stopping).parameters if name != "data")


def _best_by(spec: str | Sequence[str], restore: str, data: Mapping[str, str]) -> tuple[str, ...]:
    """The checked metrics of ``best_by``: retain metrics the data can give, each once."""
    if restore != "best":
        raise ValueError(f"best_by ranks the states of restore='best'; this run keeps restore={restore!r}")
    names = [str(n).strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    if not names or not all(names):
        raise ValueError(
            f"best_by {spec!r}: give retain metrics separated by ',', e.g. retain.prob,retain.acc"
        )
    for name in names:
        if name not in METRIC_NAMES:
            raise ValueError(unknown_metric(name, str(spec)))
        if not is_retain(name):
            raise ValueError(
                f"best_by ranks states by what the retain set keeps; {name} is not a retain metric"
            )
        if name not in available_metrics(data):
            raise ValueError(f"best_by: {why_unavailable(name, data)}")
    if len(set(names)) != len(names):
        raise ValueError(f"best_by {spec!r} names a metric twice")
    return tuple(names)
