"""Refuse, before the weights load, a run whose memory plan peaks above what the device has.

The plan is made with the run's options, precision and engine, every example as long as the longest
(batches are padded) and ``fisher_memory=None`` as one layer's accumulators. Available: what
:func:`~fastunlearn.fisher.budget.available_memory` finds, plus the bytes of a model given as a module
already on the device (the plan counts them too). A model the plan cannot run is not refused: the check
is skipped with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fastunlearn.engines import distributed
from fastunlearn.fisher.budget import available_memory, format_bytes
from fastunlearn.models.devices import training_device, weights_dtype
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.plan import MemoryPlan, plan_memory


def _resident(model: nn.Module | None, device: torch.device) -> int:
    """Bytes of ``model``'s parameters already on ``device``: counted by the plan as well."""
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)


def check_run_memory(cfg: UnlearnConfig, checked: Any, precision: str, engine: str) -> MemoryPlan | None:
    """``ValueError`` (a line, then the plan's table) if the plan's peak exceeds what the device has;
    the plan, or ``None`` with a warning when there is none."""
    device = training_device()
    module = cfg.model if isinstance(cfg.model, nn.Module) else None
    tokens = max((len(e.input_ids) for e in checked.forget + checked.retain), default=2)
    try:
        plan = plan_memory(
            cfg, config=checked.config, tokens=tokens, device=device.type, precision=precision,
            dtype=weights_dtype(module) if module is not None else None, world_size=distributed.world_size(),
            engine=engine,
        )  # fmt: skip
    except Exception as err:  # the plan advises; a model it cannot run still runs
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"memory check skipped: no memory plan for this model ({reason})", stacklevel=2)
        return None
    available = available_memory(device) + _resident(module, device)
    if plan.peak_bytes > available:
        remedies = "lower batch_size, max_length or lora_r"
        if not cfg.gradient_checkpointing:
            remedies += ", use gradient_checkpointing"
        raise ValueError(
            f"the run does not fit the device ({device}): phase {plan.peak_phase.name!r} is predicted to "
            f"take {format_bytes(plan.peak_bytes)} ({plan.peak_bytes} bytes) but {format_bytes(available)} "
            f"({available} bytes) is available; {remedies}, or pass memory_check=False to run anyway "
            "(the plan is an estimate)\n" + plan.format_table()
        )
    return plan
