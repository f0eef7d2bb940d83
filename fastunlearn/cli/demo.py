"""``fastunlearn demo``: the whole unlearning job, offline, on a laptop CPU in a few minutes."""

from __future__ import annotations

import argparse

from fastunlearn.cli.parser import add_command, options_from_args
from fastunlearn.options.unlearn import DemoOptions, UnlearnConfig

# The run's options the demo takes, and its own defaults for them.
_RUN_OPTIONS = ("output_dir", "method", "init", "seed", "overwrite", "progress", "threads")
_DEFAULTS = {"output_dir": "fastunlearn-demo", "threads": 1}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers, "demo", _main, [UnlearnConfig, DemoOptions], interrupted=_interrupted, config=False,
        only={UnlearnConfig: lambda name, spec: name in _RUN_OPTIONS}, defaults=_DEFAULTS,
        description="Run the whole unlearning job offline: generate a synthetic TOFU-format data set of "
        "fictitious authors (10% to forget), train a tokenizer, a small Llama model that memorises it and a "
        "retain-only reference model (both cached), unlearn the forget set, print before/after metrics and "
        "write OUTPUT/metrics.json. The equivalent `fastunlearn unlearn` command line is printed and "
        "recorded in OUTPUT/run_config.json.",
    )  # fmt: skip
    next(a for a in p._actions if a.dest == "output_dir").help = (
        "the demo's output directory: the unlearned adapter, metrics.json (before/after metrics), "
        "run_config.json and the trajectory; a finished run there is replaced only with --overwrite "
        f"(default: {_DEFAULTS['output_dir']})"
    )
    return p


def _options(args: argparse.Namespace) -> dict:
    return {**_DEFAULTS, **options_from_args(args, UnlearnConfig), **options_from_args(args, DemoOptions)}


def _main(args: argparse.Namespace) -> int:
    from fastunlearn.demo import run_demo

    options = _options(args)
    run_demo(options.pop("output_dir"), **options)
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    from fastunlearn.training.outputs import interrupted_message

    return interrupted_message(_options(args)["output_dir"], resume_offered=False)
