"""Evaluation protocols of the paper (SPEC §4): TOFU and extraction, and per-epoch trainer callbacks.

- :func:`evaluate` runs either protocol or both and returns JSON-serialisable results;
  :func:`~fastunlearn.evaluation.report.format_table` renders them for a terminal.
- TOFU: :mod:`~fastunlearn.data.tofu_files` (the files), :mod:`~fastunlearn.evaluation.tofu`
  (scores, forget quality, model utility), :mod:`~fastunlearn.evaluation.reference` (the retain-only
  model's truth ratios).
- Extraction: :mod:`~fastunlearn.evaluation.extraction` (MA and EL_n of memorised text).
- The metrics themselves, on any causal LM: :mod:`~fastunlearn.evaluation.metrics`
  (``fastunlearn.metrics``).
- :class:`EpochEvaluationCallback` and :class:`ExtractionStoppingCallback`
  (:mod:`~fastunlearn.evaluation.callbacks`) plug into any ``transformers.Trainer``; they load
  ``transformers`` on first use.
- Stopping rules (:mod:`~fastunlearn.evaluation.stopping`: the metric namespace, the threshold /
  extraction / TOFU rules, the controller), evaluation during training on bounded subsets with the
  ``Trainer`` callback that stops and restores (:mod:`~fastunlearn.evaluation.stop_callback`) and its
  ``trajectory.csv`` / ``.png`` (:mod:`~fastunlearn.evaluation.trajectory`); ``unlearn(stop=...)``
  wires them into a run.

Evaluation reads and tokenises data with the training pipeline (:mod:`fastunlearn.data.examples`), so
an evaluated prompt is the trained prompt, and imports nothing else of the training layer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastunlearn.data.tofu_files import TOFU_SETS, TofuItem, find_tofu_files, read_tofu_file
from fastunlearn.evaluation.extraction import evaluate_extraction, tokenize_texts
from fastunlearn.evaluation.reference import load_reference_truth_ratios, save_reference_truth_ratios
from fastunlearn.evaluation.report import format_table, summary_table
from fastunlearn.evaluation.tofu import (
    TOFU_MODES,
    cached_reference_truth_ratios,
    evaluate_tofu,
    summarize_tofu,
)
from fastunlearn.models.loading import load_model_and_tokenizer

__all__ = [
    "TOFU_MODES",
    "TOFU_SETS",
    "TofuItem",
    "cached_reference_truth_ratios",
    "evaluate",
    "evaluate_extraction",
    "evaluate_tofu",
    "find_tofu_files",
    "format_table",
    "load_reference_truth_ratios",
    "read_tofu_file",
    "save_reference_truth_ratios",
    "summarize_tofu",
    "summary_table",
    "tokenize_texts",
]


def evaluate(
    model: torch.nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    tofu: str | os.PathLike | Mapping[str, Any] | None = None,
    extraction: str | os.PathLike | Sequence[str] | None = None,
    tofu_options: Mapping[str, Any] | None = None,
    extraction_options: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` with the TOFU and/or extraction protocols; JSON-serialisable results.

    ``model`` may be a loaded causal LM (with its ``tokenizer``) or a local directory (loaded with
    ``transformers`` from local files only). Options go to :func:`evaluate_tofu` /
    :func:`evaluate_extraction`.
    """
    if tofu is None and extraction is None:
        raise ValueError(
            "nothing to evaluate: give tofu=DATA (TOFU files) and/or extraction=FILE ({'text'} lines)"
        )
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model_and_tokenizer(model, tokenizer, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed with a model object")
    results: dict[str, Any] = {}
    if tofu is not None:
        results["tofu"] = evaluate_tofu(model, tokenizer, tofu, **dict(tofu_options or {}))
    if extraction is not None:
        results["extraction"] = evaluate_extraction(
            model, tokenizer, extraction, **dict(extraction_options or {})
        )
    return results
