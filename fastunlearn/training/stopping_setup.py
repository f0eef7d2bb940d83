"""Stopping rules inside :func:`fastunlearn.unlearn`: the options checked before the model loads, the
evaluator and callback once the data is tokenised, and the rule's reference values measured before
the adapters are initialised.

:func:`unlearn` calls, in this order:

1. :func:`plan_run_stopping` with the record format of each set, before any model loads: every
   stopping option (rule, schedule, patience, restore, unseen text, reference model) is checked
   there, so bad input is one error and nothing has been loaded or written.
2. :func:`prepare_unseen` after the tokenizer is known: the unseen text of the extraction rule,
   tokenised as raw text.
3. :func:`stopping_callback` before LoRA / FILA: the extraction rule's unseen-text values are measured
   on the model before unlearning (so a rule that can never fire fails before the Fisher estimate),
   the TOFU rule's on the retain-only reference model, loaded like the model and freed again.

The :class:`~fastunlearn.evaluation.stop_callback.StoppingCallback` it returns evaluates during
training, stops, and puts the kept state back when training ends; everything :func:`unlearn` saves
afterwards (adapter, merged model, ``metrics["after"]``) is that state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn.evaluation.stop_callback import StoppingCallback, SubsetEvaluator, measure_reference
from fastunlearn.evaluation.stopping import StopPlan, plan_stopping
from fastunlearn.models.devices import to_training_device
from fastunlearn.models.loading import load_model_and_tokenizer
from fastunlearn.models.precision import weights_dtype
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.training.outputs import TRAJECTORY_FILES

__all__ = [
    "TRAJECTORY_FILES",
    "plan_run_stopping",
    "prepare_unseen",
    "record_inputs",
    "stopping_callback",
]


def plan_run_stopping(cfg: UnlearnConfig, formats: Mapping[str, str]) -> StopPlan | None:
    """The run's validated stopping options, or ``None`` when it evaluates nothing during training.

    ``formats``: set name (``forget``, ``retain``) → record format of the run's data, which decides
    the metrics a rule may read. A resumed run goes on from the record its callback keeps beside
    each checkpoint (:meth:`~fastunlearn.evaluation.stop_callback.StoppingCallback.resume_from`).
    """
    plan = plan_stopping(
        cfg.stop,
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        restore=cfg.restore,
        eval_items=cfg.eval_items,
        generate_within=cfg.generate_within,
        best_by=cfg.best_by,
        unseen=cfg.unseen,
        reference_model=cfg.reference_model,
        data=formats,
    )
    return plan


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


def _load_reference(cfg: UnlearnConfig, model: nn.Module, tokenizer: Any) -> nn.Module:
    """The TOFU rule's retain-only model, loaded with the run's loader options and dtype, on the
    model's device; it must share the vocabulary (the forget subset is tokenised once, for both)."""
    reference, _ = load_model_and_tokenizer(
        cfg.reference_model,
        tokenizer,
        trust_remote_code=cfg.trust_remote_code,
        allow_download=cfg.allow_download,
        dtype=weights_dtype(model),  # the dtype the run loaded the model in
    )
    to_training_device(reference)
    vocab = model.get_input_embeddings().num_embeddings
    ref_vocab = reference.get_input_embeddings().num_embeddings
    if ref_vocab != vocab:
        raise ValueError(
            f"the reference model's vocabulary ({ref_vocab}) differs from the model's ({vocab}): the tofu "
            "rule compares both on the same tokenised forget set, so they must share the tokenizer"
        )
    return reference


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
    evaluator = SubsetEvaluator(
        tokenizer,
        forget,
        retain or None,
        unseen or None,
        eval_items=plan.eval_items,
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.eval_max_new_tokens,
    )
    rule = plan.rule
    if rule is not None and rule.reference_source == "reference_model" and not rule.resolved:
        reference = _load_reference(cfg, model, tokenizer)
        rule = measure_reference(rule, evaluator, reference)
        del reference
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    elif rule is not None:
        # The extraction rule's unseen-text values, now: a rule that can never fire (the model
        # extracts nothing of the unseen text) fails before the Fisher estimate, not after it.
        rule = measure_reference(rule, evaluator, model)
    controller = dataclasses.replace(plan, rule=rule).controller()
    return StoppingCallback(controller, evaluator, every=plan.every, output_dir=output_dir)


def record_inputs(cfg: UnlearnConfig) -> dict[str, Any]:
    """How ``run_config.json`` records the stopping inputs: a path as an absolute path, an object (a
    list of texts, a model) as ``"<in-memory>"``."""

    def name(value: Any) -> str | None:
        if value is None:
            return None
        return os.path.abspath(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else "<in-memory>"

    return {"unseen": name(cfg.unseen), "reference_model": name(cfg.reference_model)}
