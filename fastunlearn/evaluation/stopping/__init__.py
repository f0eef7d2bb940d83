"""Stopping rules (when has the model forgotten, which state to keep), pure Python: :mod:`~.rules`,
:mod:`~.parsing` (every check before a model loads), :mod:`~.controller` (the decisions)."""

from fastunlearn.evaluation.stopping.controller import (
    DEFAULT_RETAIN_METRICS,
    StoppingController,
    parse_eval_every,
    retain_score,
)
from fastunlearn.evaluation.stopping.parsing import PLAN_OPTIONS, parse_stop_rule, plan_stopping
from fastunlearn.evaluation.stopping.rules import (
    EL_N,
    Bound,
    StopRule,
    available_metrics,
    is_generated,
    is_retain,
)

__all__ = [
    "DEFAULT_RETAIN_METRICS",
    "EL_N",
    "PLAN_OPTIONS",
    "Bound",
    "StopRule",
    "StoppingController",
    "available_metrics",
    "is_generated",
    "is_retain",
    "parse_eval_every",
    "parse_stop_rule",
    "plan_stopping",
    "retain_score",
]
