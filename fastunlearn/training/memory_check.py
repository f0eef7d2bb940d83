"""Refuse, before the weights load, a run whose predicted peak memory exceeds what the device has.

:func:`check_memory` builds the run's memory plan (:func:`fastunlearn.plan.memory_plan.plan_memory`, from the
model's configuration alone) with the run's own options and compares its peak — the largest phase's
live tensors — with :func:`device_available`:

- CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused
  (:func:`fastunlearn.fisher.budget.available_memory`). That is the card's total less what other
  processes hold and less this process's CUDA context and live tensors. The context is measured
  here (``mem_get_info`` has created it), so the plan's context allowance
  (:attr:`~fastunlearn.plan.memory_plan.MemoryPlan.context_bytes`) is not added to the peak.
- CPU: the host's available memory (``MemAvailable``). A CPU run that outgrows it swaps or is killed
  by the OOM killer after the model has loaded, which is worth a refusal as much as a CUDA OOM is; the
  plan's CPU terms (``device="cpu"``) were measured on CPU (tests/test_memory_plan.py).

A model passed as a module already holds its weights: their bytes on the training device count as
available, since the plan counts them too. The plan is made for the run as it will run:

- ``T`` is the longest tokenised example of the forget and retain sets, not ``max_length``: batches are
  padded to their longest example, so a ``max_length`` the data never reaches takes no memory.
- ``fisher_memory=None`` lets the Fisher passes size their groups to what is free, so the plan takes
  the smallest budget they can run with: one layer's forget and retain accumulators.
- The plan has one dtype for weights and activations; where they differ (fp32 weights under bf16 or
  fp16 autocast: ``init="full"``, ``precision="fp16"``) it is made in fp32, an upper bound.
- Several processes are planned with the run's ``engine``: ``"ddp"`` replicas of ``world_size``
  ranks (also ZeRO-1/2, an upper bound), ``"fsdp"`` (fastunlearn's FSDP: sharded after FILA) or
  ``"zero3"`` (created sharded); only the main process decides
  (:func:`fastunlearn.engines.distributed.on_main` shares its refusal).

A model the plan cannot describe (not a Llama-architecture decoder, a field it needs missing, target
modules that are not Llama's linear layers) is not refused: the check is skipped with a warning
saying why, and the run goes on.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn.fisher.budget import available_memory, format_bytes, parse_bytes
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.memory_plan import MemoryPlan, model_shape, plan_memory
from fastunlearn.plan.model_shapes import LINEARS

__all__ = ["check_memory", "check_run_memory", "device_available", "run_plan"]


def device_available(device: torch.device) -> int:
    """Bytes that tensors on ``device`` could take now (module docstring)."""
    return available_memory(device)


def _targets(target_modules: list[str] | None) -> tuple[str, ...] | None:
    """The plan's target suffixes for ``target_modules`` (an entry naming one layer is planned on every
    layer: an upper bound); ``ValueError`` for an entry that is not one of Llama's linear layers."""
    if target_modules is None:
        return None
    kinds = {spec.rsplit(".", 1)[-1] for spec in target_modules}
    unknown = sorted(kinds - set(LINEARS))
    if unknown:
        raise ValueError(f"target_modules {unknown} are not among the planned linear layers {list(LINEARS)}")
    return tuple(k for k in LINEARS if k in kinds)


def run_plan(
    config: Any,
    *,
    cfg: UnlearnConfig,
    tokens: int,
    weights: torch.dtype,
    device: torch.device,
    world_size: int,
    engine: str = "ddp",
) -> MemoryPlan:
    """The memory plan of a run (module docstring): ``config`` a ``transformers`` config (or anything
    :func:`~fastunlearn.plan.memory_plan.model_shape` reads), ``tokens`` the longest example, ``weights``
    the dtype the weights are loaded in. ``ValueError`` when the plan cannot describe the model."""
    shape = model_shape(config)
    targets = _targets(cfg.target_modules)
    fisher_memory = cfg.fisher_memory
    if fisher_memory is None:
        linears = shape.linears()
        fisher_memory = 8 * max(out * n_in for out, n_in in (linears[t] for t in targets or LINEARS))
    return plan_memory(
        shape,
        batch_size=cfg.batch_size,
        max_length=max(tokens, 2),
        rank=cfg.lora_r,
        init=cfg.init,
        method=cfg.method,
        gradient_checkpointing=cfg.gradient_checkpointing,
        fused_linear=cfg.fused is not False,
        dtype="bfloat16" if weights == torch.bfloat16 else "float32",
        fisher_memory=parse_bytes(fisher_memory),
        fisher_batch_size=cfg.fisher_batch_size,
        fila_solver=cfg.fila_solver,
        evaluate=cfg.evaluate,
        eval_batch_size=cfg.eval_batch_size,
        merge=cfg.merge,
        target_modules=targets,
        world_size=world_size,
        engine=engine if world_size > 1 else "none",
        device="cuda" if device.type == "cuda" else "cpu",
    )


def _resident(model: nn.Module | None, device: torch.device) -> int:
    """Bytes of ``model``'s parameters already on ``device``: the plan's weights term (buffers, which
    it does not count, are not added either)."""
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == device.type)


def check_memory(
    config: Any,
    examples: list[fdata.Example],
    *,
    cfg: UnlearnConfig,
    weights: torch.dtype,
    device: torch.device,
    world_size: int,
    engine: str = "ddp",
    model: nn.Module | None = None,
) -> MemoryPlan | None:
    """Refuse the run if its plan's peak exceeds what ``device`` has (module docstring).

    ``examples``: the tokenised forget and retain examples; ``model``: the module when the run was
    given one. Returns the plan, or ``None`` (with a warning) when no plan can be made for the model.
    Raises ``ValueError``: one line naming the phase, the predicted and the available bytes and
    ``memory_check=False``, then the plan's table.
    """
    tokens = max((len(e.input_ids) for e in examples), default=2)
    try:
        plan = run_plan(
            config,
            cfg=cfg,
            tokens=tokens,
            weights=weights,
            device=device,
            world_size=world_size,
            engine=engine,
        )
    except (ValueError, TypeError) as err:
        warnings.warn(f"memory check skipped: no memory plan for this model ({err})", stacklevel=2)
        return None
    available = device_available(device) + _resident(model, device)
    if plan.peak_bytes > available:
        peak = max(plan.phases, key=lambda p: p.peak_bytes)
        remedies = "lower batch_size, max_length or lora_r"
        if not cfg.gradient_checkpointing:
            remedies += ", use gradient_checkpointing"
        raise ValueError(
            f"the run does not fit the device ({device}): phase {peak.name!r} is predicted to take "
            f"{format_bytes(plan.peak_bytes)} ({plan.peak_bytes} bytes) but {format_bytes(available)} "
            f"({available} bytes) is available; {remedies}, or pass memory_check=False to run anyway "
            "(the plan is an estimate)\n" + plan.format_table()
        )
    return plan


def check_run_memory(cfg: UnlearnConfig, checked: Any, precision: str, engine: str) -> MemoryPlan | None:
    """:func:`check_memory` for a checked run: its model (a path, or a module already holding its
    weights), tokenised data, precision and engine."""
    from fastunlearn.engines import distributed
    from fastunlearn.models.devices import training_device
    from fastunlearn.models.precision import load_dtype, weights_dtype

    module = cfg.model if isinstance(cfg.model, nn.Module) else None
    world_size = distributed.world_size()
    return check_memory(
        checked.config,
        checked.forget + checked.retain,
        cfg=cfg,
        weights=load_dtype(precision, cfg.init) if module is None else weights_dtype(module),
        device=training_device(),
        world_size=world_size,
        engine=engine if engine in ("fsdp", "zero3") else "ddp",
        model=module,
    )
