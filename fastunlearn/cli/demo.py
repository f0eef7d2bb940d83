"""``fastunlearn demo``: the whole unlearning job, offline, on a laptop CPU in a few minutes."""

from __future__ import annotations

import argparse

from fastunlearn.cli import summary
from fastunlearn.cli._args import add_threads_arg, option_flags

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn demo``."""
    from fastunlearn.demo import SIZES, default_cache_dir
    from fastunlearn.training.config import INITS
    from fastunlearn.training.methods import METHODS

    p = subparsers.add_parser(
        "demo",
        help=summary("demo"),
        description="Run the whole unlearning job offline: generate a synthetic TOFU-format data set of "
        "fictitious authors (10% to forget), train a tokenizer, a small Llama model that memorises it and a "
        "retain-only reference model (both cached), unlearn the forget set, print before/after metrics and "
        "write OUTPUT/metrics.json. The equivalent `fastunlearn unlearn` command line is printed and "
        "recorded in OUTPUT/run_config.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", default="fastunlearn-demo", help="output directory (default: %(default)s)")
    p.add_argument(
        "--method", default="ihl", choices=METHODS, help="unlearning objective (default: %(default)s)"
    )
    p.add_argument(
        "--init", default="fila", choices=INITS, help="adapter initialisation (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data, models and training (default: 0)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help=f"where the data and pre-trained demo models are cached (default: {default_cache_dir()})",
    )
    p.add_argument(
        "--size",
        default="small",
        choices=list(SIZES),
        help="'tiny' is a reduced, faster demo used by the tests (default: %(default)s)",
    )
    p.add_argument(
        "--stop",
        action="store_true",
        help="stop by the tofu rule (forget accuracy and ROUGE-L at the retain-only model's), 3 evaluations "
        "past the first crossing, keeping the best state, instead of training the fixed 10 epochs",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --output")
    add_threads_arg(p, default=1, why="(default: %(default)s, the fastest for the demo's small model)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(
        func=_main,
        interrupted=_interrupted,
        option_flags=option_flags(p, {"output_dir": "--output"}),
    )
    return p


def _main(args: argparse.Namespace) -> int:
    from fastunlearn.demo import run_demo

    run_demo(
        args.output,
        method=args.method,
        init=args.init,
        seed=args.seed,
        size=args.size,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        threads=args.threads,
        stop=args.stop,
    )
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    from fastunlearn.training.outputs import interrupted_message

    return interrupted_message(args.output, resume_offered=False)
