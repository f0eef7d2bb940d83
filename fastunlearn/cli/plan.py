"""``fastunlearn plan``: the predicted peak device memory of an ``unlearn`` run, phase by phase, from
the model's config alone. MODEL is a known name (``llama2-7b``, ``llama3-8b``, …), a ``config.json``, a
model directory holding one or a Hub id in the local Hugging Face cache; the run's options are
``unlearn``'s own."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from fastunlearn.cli import summary

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn plan``."""
    from fastunlearn.cli.parser import add_config_option, add_options, flags_of
    from fastunlearn.options.plan import PlanOptions
    from fastunlearn.options.unlearn import UnlearnConfig

    p = subparsers.add_parser(
        "plan",
        help=summary("plan"),
        description="Predict the peak device memory of each phase of `fastunlearn unlearn` (load, evaluate, "
        "Fisher passes, FILA, a training step, save) from MODEL's config alone. Live tensors only "
        "(torch.cuda.max_memory_allocated); the CUDA context is added to the total.",
    )
    add_config_option(p)
    add_options(p, UnlearnConfig, only=lambda spec: spec.plan)
    add_options(p, PlanOptions)
    p.set_defaults(func=_run_plan, option_flags=flags_of(UnlearnConfig, PlanOptions))
    return p


def _run_plan(args: argparse.Namespace) -> int:
    from fastunlearn.cli.parser import options_from_args
    from fastunlearn.options.plan import PlanOptions
    from fastunlearn.options.schema import require
    from fastunlearn.options.unlearn import UnlearnConfig
    from fastunlearn.plan.memory_plan import plan_memory

    cfg = UnlearnConfig(**options_from_args(args, UnlearnConfig))
    how = PlanOptions(**options_from_args(args, PlanOptions))
    if cfg.model is None:
        require(cfg)
    plan = plan_memory(
        _cached_config(cfg.model),
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        rank=cfg.lora_r,
        init=cfg.init,
        method=cfg.method,
        gradient_checkpointing=cfg.gradient_checkpointing,
        fused_linear=cfg.fused is not False,
        world_size=how.world_size,
        engine={"zero2": "ddp"}.get(how.engine, how.engine) if how.world_size > 1 else "none",
    )
    if how.json:
        phases = [{"name": p.name, "peak_bytes": p.peak_bytes} for p in plan.phases]
        print(
            json.dumps({"model": plan.model.name, "phases": phases, "peak_bytes": plan.peak_bytes}, indent=2)
        )
    else:
        print(plan.format_table(terms=how.terms))
    return 0


def _cached_config(model: Any) -> Any:
    """A Hub id that is not a known model name nor a path: its ``config.json`` in the local Hugging
    Face cache (nothing is fetched); a name the cache lacks as it is (the plan names what it takes)."""
    from fastunlearn._hub import is_hub_id, resolve_snapshot
    from fastunlearn.plan.model_shapes import KNOWN_MODELS

    if not isinstance(model, str) or model in KNOWN_MODELS or os.path.exists(model) or not is_hub_id(model):
        return model
    try:
        return os.path.join(resolve_snapshot(model, patterns=["config.json"]).path, "config.json")
    except FileNotFoundError:
        return model
