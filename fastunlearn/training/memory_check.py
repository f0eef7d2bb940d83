"""Refuse, before the weights load, a run whose predicted peak memory exceeds what the device has.

:func:`check_run_memory` makes the run's memory plan (:func:`fastunlearn.plan.plan.plan_memory`: the
run's phases executed on fake tensors built from the model's configuration) with the run's own
options and compares its peak — the largest phase's live tensors — with :func:`device_available`:

- CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused
  (:func:`fastunlearn.fisher.budget.available_memory`): the card's total less what other processes
  hold and less this process's CUDA context and live tensors (the context is measured there, so the
  plan's allowance for it is not added).
- CPU: the host's available memory (``MemAvailable``): a CPU run that outgrows it swaps or is killed
  after the model has loaded, which is worth a refusal as much as a CUDA OOM is.

The plan is made for the run as it will run: every example as long as the longest tokenised example
of the forget and retain sets (batches are padded to their longest example), in the resolved
precision, with the weights in the dtype they will have (a model given as a module: its own, and its
bytes already on the device count as available, since the plan counts them too), under the run's
engine and number of processes; only the main process decides
(:func:`fastunlearn.engines.distributed.on_main` shares its refusal). ``fisher_memory=None`` lets the
Fisher passes size their groups to what is free, so the plan takes the smallest budget they can run
with: one layer's accumulators.

A model the plan cannot run (a configuration ``transformers`` cannot build, code the fake tensors
cannot follow) is not refused: the check is skipped with a warning saying why, and the run goes on.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fastunlearn.engines import distributed
from fastunlearn.fisher.budget import available_memory, format_bytes
from fastunlearn.models.devices import training_device
from fastunlearn.models.precision import weights_dtype
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.plan import MemoryPlan, plan_memory

__all__ = ["check_run_memory", "device_available", "run_plan"]


def device_available(device: torch.device) -> int:
    """Bytes that tensors on ``device`` could take now (module docstring)."""
    return available_memory(device)


def run_plan(cfg: UnlearnConfig, checked: Any, precision: str, engine: str) -> MemoryPlan:
    """The memory plan of a checked run (module docstring): its model's configuration, the longest
    example of its data, its resolved ``precision`` and its ``engine``."""
    module = cfg.model if isinstance(cfg.model, nn.Module) else None
    tokens = max((len(e.input_ids) for e in checked.forget + checked.retain), default=2)
    return plan_memory(
        cfg,
        config=checked.config,
        tokens=tokens,
        device=training_device().type,
        precision=precision,
        dtype=weights_dtype(module) if module is not None else None,
        world_size=distributed.world_size(),
        engine=engine,
    )


def _resident(model: nn.Module | None, device: torch.device) -> int:
    """Bytes of ``model``'s parameters already on ``device``: counted by the plan as well."""
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)


def check_run_memory(cfg: UnlearnConfig, checked: Any, precision: str, engine: str) -> MemoryPlan | None:
    """Refuse the run if its plan's peak exceeds what the training device has (module docstring).

    Returns the plan, or ``None`` (with a warning) when no plan can be made for the model. Raises
    ``ValueError``: one line naming the phase, the predicted and the available bytes and
    ``memory_check=False``, then the plan's table.
    """
    try:
        plan = run_plan(cfg, checked, precision, engine)
    except Exception as err:  # the plan advises; a model it cannot run still runs
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"memory check skipped: no memory plan for this model ({reason})", stacklevel=2)
        return None
    device = training_device()
    module = cfg.model if isinstance(cfg.model, nn.Module) else None
    available = device_available(device) + _resident(module, device)
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
