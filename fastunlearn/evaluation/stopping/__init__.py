"""Stopping rules for unlearning runs: *when* has the model forgotten, and which state to keep.

- :mod:`~fastunlearn.evaluation.stopping.rules`: the metric namespace (``forget.prob``,
  ``retain.rougeL``, …) and the rules (threshold, extraction, TOFU) as conjunctions of bounds.
- :mod:`~fastunlearn.evaluation.stopping.parsing`: :func:`parse_stop_rule` and
  :func:`parse_eval_every`, every check before a model loads.
- :mod:`~fastunlearn.evaluation.stopping.controller`: :class:`StoppingController` (first crossing,
  patience, restore ``first`` / ``best`` / ``last``, generation only where it can decide) and
  :func:`plan_stopping`, all of a run's options checked at once.

The evaluation during training and the ``Trainer`` callback are
:mod:`fastunlearn.evaluation.stop_callback`'s; the trajectory files
:mod:`fastunlearn.evaluation.trajectory`'s. Nothing here imports torch.
"""

from fastunlearn.evaluation.stopping.controller import (
    DEFAULT_RETAIN_METRICS,
    NEAR,
    RESTORE,
    Decision,
    Evaluation,
    StoppingController,
    StopPlan,
    plan_stopping,
    retain_score,
)
from fastunlearn.evaluation.stopping.parsing import parse_eval_every, parse_stop_rule
from fastunlearn.evaluation.stopping.rules import (
    EL_N,
    KINDS,
    METRIC_NAMES,
    UNSEEN_METRICS,
    Bound,
    ExtractionRule,
    StopRule,
    ThresholdRule,
    TofuRule,
    available_metrics,
    is_generated,
    metric_help,
)

__all__ = [
    "DEFAULT_RETAIN_METRICS",
    "EL_N",
    "KINDS",
    "METRIC_NAMES",
    "NEAR",
    "RESTORE",
    "UNSEEN_METRICS",
    "Bound",
    "Decision",
    "Evaluation",
    "ExtractionRule",
    "StopPlan",
    "StopRule",
    "StoppingController",
    "ThresholdRule",
    "TofuRule",
    "available_metrics",
    "is_generated",
    "metric_help",
    "parse_eval_every",
    "parse_stop_rule",
    "plan_stopping",
    "retain_score",
]
