"""The commands that take an unlearning run's options: ``fastunlearn unlearn`` (:func:`fastunlearn.unlearn`
from the command line), ``plan`` (the run's predicted peak device memory, phase by phase) and ``demo``
(the whole job, offline, on a laptop CPU in a few minutes)."""

from __future__ import annotations

import argparse
import json
import os

from fastunlearn.cli.parser import add_command, options_from_args
from fastunlearn.options.schema import require
from fastunlearn.options.unlearn import DemoOptions, PlanOptions, UnlearnConfig

# The run's options the demo takes, and its own defaults for them.
_DEMO_RUN_OPTIONS = ("output_dir", "method", "init", "seed", "overwrite", "progress", "threads")
_DEMO_DEFAULTS = {"output_dir": "fastunlearn-demo", "threads": 1}


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_command(
        subparsers, "unlearn", _run_unlearn, [UnlearnConfig], interrupted=_interrupted,
        description="Unlearn the records of --forget from MODEL while keeping it good on --retain "
        "(IHL + FILA, Cha et al. ICLR 2025). Data: {question, answer}, {prompt, completion} or {text} "
        "records in JSON Lines, Parquet or CSV files, datasets folders or Hub data sets. Writes "
        "OUTPUT/adapter (a peft adapter for the original MODEL), OUTPUT/metrics.json and "
        "OUTPUT/run_config.json (which --config reads back).",
        epilog="example: fastunlearn unlearn ./llama2-7b-tofu --forget forget10.json --retain retain90.json "
        "--template tofu-llama2 --max-length 500 --output out/ --lr 1e-4 --bf16",
    )  # fmt: skip


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
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


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "demo", _run_demo, [UnlearnConfig, DemoOptions], interrupted=_demo_interrupted,
        config=False, only={UnlearnConfig: lambda name, spec: name in _DEMO_RUN_OPTIONS},
        defaults=_DEMO_DEFAULTS,
        description="Run the whole unlearning job offline: generate a synthetic TOFU-format data set of "
        "fictitious authors (10% to forget), train a tokenizer, a small Llama model that memorises it and a "
        "retain-only reference model (both cached), unlearn the forget set, print before/after metrics and "
        "write OUTPUT/metrics.json. The equivalent `fastunlearn unlearn` command line is printed and "
        "recorded in OUTPUT/run_config.json.",
    )  # fmt: skip
    next(a for a in p._actions if a.dest == "output_dir").help = (
        "the demo's output directory: the unlearned adapter, metrics.json (before/after metrics), "
        "run_config.json and the trajectory; a finished run there is replaced only with --overwrite "
        f"(default: {_DEMO_DEFAULTS['output_dir']})"
    )
    return p


def _run_unlearn(args: argparse.Namespace) -> int:
    from fastunlearn.evaluation.report import stopping_line, summary_table
    from fastunlearn.training.pipeline import run_unlearning

    result = run_unlearning(UnlearnConfig(**options_from_args(args, UnlearnConfig)))
    print(summary_table(result.metrics))
    written = [p for p in (result.adapter_path, result.model_path, result.merged_path) if p]
    stopping = result.metrics.get("stopping")
    if stopping is not None:
        print(stopping_line(stopping))
        files = (stopping["trajectory_csv"], stopping["trajectory_png"])
        written += [os.path.join(result.output_dir, os.path.basename(p)) for p in files if p]
    print("\nwrote " + ", ".join([*written, result.metrics_path, result.run_config_path]))
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    from fastunlearn.training.outputs import interrupted_message

    output = getattr(args, "output_dir", None)
    return interrupted_message(output) if output else "interrupted"


def _run_plan(args: argparse.Namespace) -> int:
    from fastunlearn.plan.plan import plan_memory

    cfg = UnlearnConfig(**options_from_args(args, UnlearnConfig))
    how = PlanOptions(**options_from_args(args, PlanOptions))
    if cfg.model is None:
        require(cfg)
    plan = plan_memory(cfg, device=how.device, world_size=how.world_size, engine=how.engine)
    print(json.dumps(plan.to_json(), indent=2) if how.json else plan.format_table(terms=how.terms))
    return 0


def _demo_options(args: argparse.Namespace) -> dict:
    run = {**_DEMO_DEFAULTS, **options_from_args(args, UnlearnConfig)}
    return {**run, **options_from_args(args, DemoOptions)}


def _run_demo(args: argparse.Namespace) -> int:
    from fastunlearn.demo import run_demo

    options = _demo_options(args)
    run_demo(options.pop("output_dir"), **options)
    return 0


def _demo_interrupted(args: argparse.Namespace) -> str:
    from fastunlearn.training.outputs import interrupted_message

    return interrupted_message(_demo_options(args)["output_dir"], resume_offered=False)
