"""Command-line options shared by several commands, and the map from Python names to their flags."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

__all__ = [
    "CommaList",
    "add_data_args",
    "add_model_args",
    "add_target_modules_arg",
    "add_threads_arg",
    "memory_size",
    "option_flags",
]


class CommaList(argparse.Action):
    """A list option given as ``a,b`` and/or repeated (``--x a --x b,c``): one value per use, so it
    cannot swallow the positional arguments after it the way ``nargs="+"`` does."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = [item.strip() for item in values.split(",")]
        if not all(items):
            parser.error(f"argument {option_string}: empty name in {values!r}")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), *items])


def memory_size(text: str) -> int:
    """``argparse`` type of a memory size ("64MiB", "2GB", bytes): the parse error as the message."""
    from fastunlearn.fisher import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model directory (Hugging Face format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="allow MODEL to be a Hugging Face Hub id, downloaded if not cached",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own Python code to run"
    )


def add_data_args(p: argparse.ArgumentParser, *, max_length: int = 512) -> None:
    from fastunlearn.training.data import FORMATS, TEMPLATE_NAMES

    p.add_argument(
        "--template",
        default="plain",
        choices=TEMPLATE_NAMES,
        help="prompt template of question/answer data; tofu-*: TOFU's own tokenisation (SPEC §4.1), "
        "as the TOFU models were fine-tuned (default: %(default)s)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="record format of the JSON Lines files (default: detected per file)",
    )
    p.add_argument(
        "--max-length", type=int, default=max_length, help="token cap per example (default: %(default)s)"
    )


def add_target_modules_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--target-modules",
        action=CommaList,
        default=None,
        metavar="NAME[,NAME...]",
        help="layer names or suffixes, comma-separated, repeatable (default: every linear layer but the "
        "output head)",
    )


def add_threads_arg(p: argparse.ArgumentParser, *, default: int | None = None, why: str = "") -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=default,
        help="PyTorch CPU threads (intra- and inter-op) "
        + (why or "(default: PyTorch's, one per core; on a busy machine 1 or 2 can be many times faster)"),
    )


def option_flags(p: argparse.ArgumentParser, aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Python name -> flag for every option of ``p`` (by its ``dest``), plus ``aliases`` (the Python
    names of the API the command calls, e.g. ``learning_rate`` -> ``--lr``): error messages raised in
    Python names are shown with flags."""
    found = {}
    for action in p._actions:  # argparse has no public list of a parser's actions
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            found[action.dest] = longs[0]
    return {**found, **(aliases or {})}
