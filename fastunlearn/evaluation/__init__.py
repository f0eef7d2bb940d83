"""The evaluations of unlearning: one registry and one entry point, :func:`evaluate`.

- :mod:`~fastunlearn.evaluation.evaluator`: :func:`evaluate` (any of TOFU, extraction, membership
  inference, MUSE, dialogue, lm-evaluation-harness tasks on one model, JSON-serialisable results),
  :func:`check` (every input read before a model loads), :func:`headline` (the numbers by flat name).
- :func:`format_table` renders results for a terminal (:mod:`~fastunlearn.evaluation.report`).
- The protocols: :mod:`~.tofu` (with :mod:`~.reference`, the retain-only model's truth ratios),
  :mod:`~.extraction`, :mod:`~.mia`, :mod:`~.muse`, :mod:`~.dialogue`, :mod:`~.harness`; the metrics on
  any causal LM: :mod:`~.metrics` (``fastunlearn.metrics``).
- A run's own metrics on its forget / retain data (before/after, and during training):
  :class:`~fastunlearn.evaluation.sets.SetEvaluator`; stopping rules: :mod:`~.stopping` (pure logic),
  :mod:`~.stop_callback` (the ``Trainer`` callback) and :mod:`~.trajectory` (its files).

Evaluation reads and tokenises data with the training pipeline (:mod:`fastunlearn.data.examples`), so
an evaluated prompt is the trained prompt, and imports nothing of the training layer.
"""

from __future__ import annotations

from fastunlearn.data.tofu_files import TOFU_SETS, TofuItem, find_tofu_files, read_tofu_file
from fastunlearn.evaluation.evaluator import EVALUATIONS, check, evaluate, headline
from fastunlearn.evaluation.extraction import evaluate_extraction, tokenize_texts
from fastunlearn.evaluation.reference import load_reference_truth_ratios, save_reference_truth_ratios
from fastunlearn.evaluation.report import format_table, summary_table
from fastunlearn.evaluation.tofu import (
    TOFU_MODES,
    cached_reference_truth_ratios,
    evaluate_tofu,
    summarize_tofu,
)

__all__ = [
    "EVALUATIONS",
    "TOFU_MODES",
    "TOFU_SETS",
    "TofuItem",
    "cached_reference_truth_ratios",
    "check",
    "evaluate",
    "evaluate_extraction",
    "evaluate_tofu",
    "find_tofu_files",
    "format_table",
    "headline",
    "load_reference_truth_ratios",
    "read_tofu_file",
    "save_reference_truth_ratios",
    "summarize_tofu",
    "summary_table",
    "tokenize_texts",
]
