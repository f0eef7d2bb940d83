"""Stopping rules inside :func:`fastunlearn.unlearn`, in the pipeline's order:

1. :func:`plan_run_stopping`, before any model loads: every stopping option checked at once.
2. :func:`prepare_unseen` once the tokenizer is known: the extraction rule's unseen text as raw text.
3. :func:`stopping_callback` before LoRA / FILA: the rule's reference measured — the extraction rule's
   on the model before unlearning (a rule that can never fire fails before the Fisher estimate), the
   tofu and muse rules' on the retain-only / retrained model, loaded like the model and freed again.

The :class:`~fastunlearn.evaluation.stop_callback.StoppingCallback` it returns evaluates during
training, stops, and puts the kept state back when training ends; everything saved afterwards
(adapter, merged model, ``metrics["after"]``) is that state.
"""

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

__all__ = ["plan_run_stopping", "prepare_unseen", "stopping_callback"]


def plan_run_stopping(cfg: UnlearnConfig, formats: Mapping[str, str]) -> StopPlan | None:
    """The run's validated stopping options, or ``None`` when it evaluates nothing during training.
    ``formats``: set name → record format of the run's data (``"muse": "muse"`` with a MUSE
    directory), which decides the metrics a rule may read."""
    return plan_stopping(**{name: getattr(cfg, name) for name in PLAN_OPTIONS}, data=formats)


def prepare_unseen(cfg: UnlearnConfig, tokenizer: Any) -> list[fdata.Example]:
    """The extraction rule's unseen text (a ``{"text"}`` JSON Lines path or a list of texts) as raw-text
    examples; empty without one."""
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
    """The evaluating, stopping callback of a run, its rule's reference values measured: call it with
    the model before unlearning (before LoRA / FILA)."""
    muse = {"muse_dir": cfg.muse, "max_items": plan.eval_items, "batch_size": cfg.eval_batch_size}
    evaluator = SetEvaluator(
        tokenizer,
        forget,
        retain or None,
        unseen or None,
        eval_items=plan.eval_items,
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.eval_max_new_tokens,
        muse=None if cfg.muse is None else muse,
    )
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
