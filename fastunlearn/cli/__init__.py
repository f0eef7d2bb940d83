"""The ``fastunlearn`` command: ``unlearn``, ``fisher``, ``demo``, ``eval``.

Every subcommand lives in a module of this package exposing ``add_parser(subparsers)``, which
registers it on the ``argparse`` sub-parser collection and sets ``func`` (``args -> exit code``) as its
default; options shared by several commands are in :mod:`~fastunlearn.cli._args`. Adding a subcommand
is one module and one line in :data:`SUBCOMMANDS`. User errors (bad data, a missing model, a non-empty
output directory) are printed as one line and exit with status 2; ``--debug`` shows the traceback.
The command modules import what they run only when it runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# "module:function" registering one or more subcommands; imported when the parser is built.
SUBCOMMANDS = (
    "fastunlearn.cli.unlearn:add_parser",
    "fastunlearn.cli.fisher:add_parser",
    "fastunlearn.cli.demo:add_parser",
    "fastunlearn.cli.eval:add_parser",
)
# Errors that mean "the user asked for something impossible", reported without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``fastunlearn`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    from fastunlearn import __version__

    parser = argparse.ArgumentParser(
        prog="fastunlearn",
        description="LLM unlearning with Inverted Hinge Loss and Fisher-initialised LoRA.",
    )
    parser.add_argument("--version", action="version", version=f"fastunlearn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in SUBCOMMANDS:
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastunlearn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):
        # transformers' own bars (loading and writing checkpoints) obey a global switch, not ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"fastunlearn {args.command}: error: {err}", file=sys.stderr)
        return 2
