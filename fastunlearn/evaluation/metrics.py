"""TOFU's and the extraction protocol's metrics as functions on any causal LM: ``fastunlearn.metrics``."""

from fastunlearn.evaluation.decoding import greedy_decode
from fastunlearn.evaluation.extraction import extraction_likelihood, extraction_metrics, memorization_accuracy
from fastunlearn.evaluation.likelihood import (
    answer_metrics,
    answer_probability,
    answer_stats,
    basic_metrics,
    collect_answer_stats,
    example_stats,
    normalized_probability,
    token_nll,
    truth_ratio,
    truth_ratio_score,
)
from fastunlearn.evaluation.scores import forget_quality, model_utility, rouge_l_recall
from fastunlearn.models.devices import eval_mode

__all__ = [
    "answer_metrics",
    "answer_probability",
    "answer_stats",
    "basic_metrics",
    "collect_answer_stats",
    "eval_mode",
    "example_stats",
    "extraction_likelihood",
    "extraction_metrics",
    "forget_quality",
    "greedy_decode",
    "memorization_accuracy",
    "model_utility",
    "normalized_probability",
    "rouge_l_recall",
    "token_nll",
    "truth_ratio",
    "truth_ratio_score",
]
