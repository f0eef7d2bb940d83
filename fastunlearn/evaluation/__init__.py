"""The evaluations of unlearning behind one entry point, :func:`evaluate`: TOFU, extraction, membership
inference, MUSE, dialogue and lm-evaluation-harness tasks, a run's own metrics and its stopping rules.
Data is read and tokenised as in training."""

from __future__ import annotations

from fastunlearn.data.tofu_format import TOFU_SETS, TofuItem, find_tofu_files, read_tofu_file
from fastunlearn.evaluation.evaluator import EVALUATIONS, check, evaluate, headline
from fastunlearn.evaluation.extraction import evaluate_extraction, tokenize_texts
from fastunlearn.evaluation.report import format_table, summary_table
from fastunlearn.evaluation.tofu import (
    TOFU_MODES,
    cached_reference_truth_ratios,
    evaluate_tofu,
    load_reference_truth_ratios,
    save_reference_truth_ratios,
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
