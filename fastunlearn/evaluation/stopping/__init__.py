"""Stopping rules for unlearning runs: *when* has the model forgotten, and which state to keep.

:mod:`~.rules` (the metric namespace, the threshold and reference rules), :mod:`~.parsing`
(:func:`plan_stopping`, :func:`parse_stop_rule`, :func:`parse_eval_every`: every check before a model
loads) and :mod:`~.controller` (:class:`StoppingController`: first crossing, patience, restore
``first`` / ``best`` / ``last``, generation only where it can decide). Pure Python, read by the option
schema; the callback that evaluates during training is :mod:`fastunlearn.evaluation.stop_callback`'s.
"""

from fastunlearn.evaluation.stopping.controller import (
    DEFAULT_RETAIN_METRICS,
    StoppingController,
    retain_score,
)
from fastunlearn.evaluation.stopping.parsing import (
    PLAN_OPTIONS,
    StopPlan,
    parse_eval_every,
    parse_stop_rule,
    plan_stopping,
)
from fastunlearn.evaluation.stopping.rules import (
    EL_N,
    Bound,
    ReferenceRule,
    StopRule,
    ThresholdRule,
    available_metrics,
    is_generated,
    is_retain,
)

__all__ = [
    "DEFAULT_RETAIN_METRICS",
    "EL_N",
    "PLAN_OPTIONS",
    "Bound",
    "ReferenceRule",
    "StopPlan",
    "StopRule",
    "StoppingController",
    "ThresholdRule",
    "available_metrics",
    "is_generated",
    "is_retain",
    "parse_eval_every",
    "parse_stop_rule",
    "plan_stopping",
    "retain_score",
]
