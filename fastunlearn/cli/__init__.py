"""The ``fastunlearn`` command. Each subcommand is registered by a function of a module of this package
(``SUBCOMMANDS``) with ``func`` (``args -> exit code``); only the command being run is imported, so
``fastunlearn --help`` loads neither PyTorch nor ``transformers``. A user error is one line in the
command's flags with exit status 2 (``--debug``: the traceback); Ctrl-C says what is left (status 130).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence

# name -> (what registers it: "module:function(subparsers)" in this package, one-line help shown by
# `fastunlearn --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "unlearn": ("unlearn:add_parser", "unlearn a forget set from a model (LoRA, FILA or all weights)"),
    "fisher": ("fisher:add_parser", "estimate a model's diagonal Fisher information on a data set"),
    "plan": ("unlearn:add_plan_parser", "predict the peak device memory of each phase of an unlearn run"),
    "demo": ("unlearn:add_demo_parser", "run the whole unlearning job offline on a synthetic data set"),
    "eval": ("eval:add_parser", "evaluate a model: TOFU, extraction, MIA, MUSE, lm-eval, dialogue"),
}
# Errors that mean "the user asked for something impossible", reported without a traceback
# (ImportError: an optional extra that is not installed, named with its pip command).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
USER_ERRORS += (ImportError,)
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


class UsageError(Exception):
    """A command line that does not parse: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """``argparse`` reporting a bad command line in one line, and reading a word that starts with a minus
    and a digit (``-1e-4``) as a value, so that the option's own check reports it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``fastunlearn`` parser: ``commands`` (default: all) with their options, the others by name."""
    from fastunlearn import __version__  # the package's __init__ imports nothing heavy

    full = set(SUBCOMMANDS if commands is None else commands)
    parser = _Parser(
        prog="fastunlearn",
        description="LLM unlearning with Inverted Hinge Loss and Fisher-initialised LoRA.",
    )
    parser.add_argument("--version", action="version", version=f"fastunlearn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (registers, summary) in SUBCOMMANDS.items():
        if name in full:
            module, function = registers.split(":")
            getattr(importlib.import_module(f"{__name__}.{module}"), function)(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastunlearn`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Top-level options take no value, so the first other word is the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    args = None
    try:
        args = build_parser([command] if command in SUBCOMMANDS else []).parse_args(argv)
        with _plain_warnings(args):
            return _run(args)
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args is not None and args.debug:
            raise
        what = getattr(args, "interrupted", None)
        print("interrupted" if what is None else _cli_message(what(args), args), file=sys.stderr)
        return INTERRUPTED
    except USER_ERRORS as err:
        if args is None or args.debug:
            raise
        print(f"fastunlearn {args.command}: error: {_cli_message(str(err), args)}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _plain_warnings(args: argparse.Namespace):
    """fastunlearn's warnings shown as one line in the command's words (others' as they show them)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not os.path.abspath(filename).startswith(package + os.sep):
            previous(message, category, filename, lineno, file, line)
            return
        text = _cli_message(str(message), args).splitlines()[0]
        print(f"fastunlearn {args.command}: warning: {text}", file=file or sys.stderr)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "progress", True) is False:
        # transformers' own bars (loading and writing checkpoints) obey a global switch, not ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    threads = getattr(args, "threads", None)
    if threads is None:
        return int(args.func(args) or 0)
    import torch

    from fastunlearn.models.devices import num_threads

    # Settable once per process, before any inter-op work: a second command in one process keeps it.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    with num_threads(threads):
        return int(args.func(args) or 0)


def _cli_message(message: str, args: argparse.Namespace) -> str:
    """``message`` with the options' Python names replaced by the command's flags, in its first line (the
    lines after it are data, such as a refused run's memory plan)."""
    flags = getattr(args, "option_flags", None)
    if not flags:
        return message
    from fastunlearn.cli.parser import to_flags

    first, newline, rest = message.partition("\n")
    return to_flags(first, flags) + newline + rest
