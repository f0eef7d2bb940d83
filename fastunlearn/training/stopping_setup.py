"""Stopping rules inside a run: the options checked before any model loads, the extraction rule's unseen
text, and the callback, whose rule's reference is measured on the model before unlearning (extraction)
or on the retain-only / retrained model (tofu, muse), loaded like the model and freed again."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn.evaluation.evaluator import load_like
from fastunlearn.evaluation.sets import SetEvaluator
from fastunlearn.evaluation.stop_callback import StoppingCallback, measure_reference
from fastunlearn.evaluation.stopping import PLAN_OPTIONS, StopPlan, plan_stopping
from fastunlearn.options.unlearn import UnlearnConfig


def plan_run_stopping(cfg: UnlearnConfig, formats: Mapping[str, str]) -> StopPlan | None:
    """The run's checked stopping options, or ``None``; ``formats`` (set name → record format) decides
    the metrics a rule may read."""
    return plan_stopping(**{name: getattr(cfg, name) for name in PLAN_OPTIONS}, data=formats)


def prepare_unseen(cfg: UnlearnConfig, tokenizer: Any) -> list[fdata.Example]:
    """The extraction rule's unseen text (a ``{"text"}`` file or a list of texts) as examples."""
    if cfg.unseen is None:
        return []
    data = cfg.unseen if isinstance(cfg.unseen, (str, os.PathLike)) else [{"text": t} for t in cfg.unseen]
    return fdata.prepare(
        data, tokenizer, name="unseen", data_format="text", max_length=cfg.max_length,
        allow_download=cfg.allow_download,
    )  # fmt: skip


def stopping_callback(
    plan: StopPlan,
    cfg: UnlearnConfig,
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[fdata.Example],
    retain: Sequence[fdata.Example],
    unseen: Sequence[fdata.Example],
    output_dir: str,
) -> StoppingCallback:
    """The run's evaluating, stopping callback; call it with the model before LoRA / FILA."""
    muse = {"muse_dir": cfg.muse, "max_items": plan.eval_items, "batch_size": cfg.eval_batch_size}
    evaluator = SetEvaluator(
        tokenizer, forget, retain or None, unseen or None, eval_items=plan.eval_items,
        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens,
        muse=None if cfg.muse is None else muse,
    )  # fmt: skip
    rule = plan.rule
    if rule is not None and not rule.resolved and rule.reference_source == "model":
        rule = measure_reference(rule, evaluator, model)
    elif rule is not None and not rule.resolved:
        access = dict(trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download)
        reference = load_like(rule.input, model, tokenizer, **access)
        rule = measure_reference(rule, evaluator, reference)
        del reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    controller = dataclasses.replace(plan, rule=rule).controller()
    return StoppingCallback(controller, evaluator, every=plan.every, output_dir=output_dir)
