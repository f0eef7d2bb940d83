"""Command-line options shared by the commands that load a model and read training-format data."""

from __future__ import annotations

import argparse

__all__ = ["add_data_args", "add_model_args", "memory_size"]


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


def add_data_args(p: argparse.ArgumentParser) -> None:
    from fastunlearn.training.data import FORMATS, TEMPLATE_NAMES

    p.add_argument(
        "--template",
        default="plain",
        choices=TEMPLATE_NAMES,
        help="prompt template of question/answer data (default: %(default)s)",
    )
    p.add_argument(
        "--format",
        dest="data_format",
        default="auto",
        choices=("auto", *FORMATS),
        help="record format of the JSON Lines files (default: detected per file)",
    )
    p.add_argument("--max-length", type=int, default=512, help="token cap per example (default: %(default)s)")
