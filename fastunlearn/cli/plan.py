"""``fastunlearn plan``: the predicted peak device memory of an ``unlearn`` run, phase by phase."""

from __future__ import annotations

import argparse
import json

from fastunlearn.cli.parser import add_command, options_from_args
from fastunlearn.options.schema import require
from fastunlearn.options.unlearn import PlanOptions, UnlearnConfig


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_command(
        subparsers, "plan", _run_plan, [UnlearnConfig, PlanOptions],
        only={UnlearnConfig: lambda name, spec: spec.plan},
        description="Predict the peak device memory of each phase of `fastunlearn unlearn` (load, evaluate, "
        "Fisher passes, FILA, a training step, save): the phases run on fake tensors (shapes, no data) "
        "built from MODEL's config, their live tensors counted (torch.cuda.max_memory_allocated); the "
        "CUDA context is added to the total. MODEL: a model directory, its config.json, a Hub id in the "
        "local cache or a well-known name (llama2-7b, llama3-8b, mistral-7b, qwen2.5-7b, phi-1.5, "
        "gpt-neo-2.7b).",
    )  # fmt: skip


def _run_plan(args: argparse.Namespace) -> int:
    from fastunlearn.plan.plan import plan_memory

    cfg = UnlearnConfig(**options_from_args(args, UnlearnConfig))
    how = PlanOptions(**options_from_args(args, PlanOptions))
    if cfg.model is None:
        require(cfg)
    plan = plan_memory(cfg, device=how.device, world_size=how.world_size, engine=how.engine)
    print(json.dumps(plan.to_json(), indent=2) if how.json else plan.format_table(terms=how.terms))
    return 0
