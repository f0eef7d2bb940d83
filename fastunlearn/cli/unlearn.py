"""``fastunlearn unlearn``: :func:`fastunlearn.unlearn` from the command line."""

from __future__ import annotations

import argparse
import os

from fastunlearn.cli.parser import add_command, options_from_args
from fastunlearn.options.unlearn import UnlearnConfig


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
