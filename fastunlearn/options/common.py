"""Option groups shared by several commands: the model and how it may be loaded, how records become
token sequences, and how a command runs (threads, progress bars)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastunlearn.data import FORMATS, TEMPLATE_NAMES
from fastunlearn.options.schema import option

__all__ = ["DataShape", "ModelAccess", "RunControl"]


@dataclass
class ModelAccess:
    """The model a command works on, and what loading it may do."""

    model: Any = option(
        None,
        "a local model directory (Hugging Face format) or a peft adapter directory; in Python also a "
        "loaded causal LM",
        flag="",
        path=True,
        plan=True,
    )
    tokenizer: Any = option(None, "tokenizer directory (default: the model's)", path=True, group="model")
    trust_remote_code: bool = option(
        False, "allow the model's own Python code to run", identity=False, plan=True, group="model"
    )
    allow_download: bool = option(
        False,
        "allow MODEL to be a Hugging Face Hub id, downloaded if not cached",
        identity=False,
        group="model",
    )


@dataclass
class DataShape:
    """How data records become token sequences."""

    template: str = option(
        "plain",
        "prompt template of question/answer records; tofu-*: TOFU's own tokenisation, as the TOFU models "
        "were fine-tuned",
        choices=TEMPLATE_NAMES,
        group="data",
    )
    data_format: str = option(
        "auto",
        "record format of the data files (default: detected per file)",
        flag="--format",
        choices=("auto", *FORMATS),
        group="data",
    )
    max_length: int = option(512, "token cap per example", positive=True, plan=True, group="data")


@dataclass
class RunControl:
    """How a command runs, never what it computes."""

    threads: int | None = option(
        None,
        "PyTorch CPU threads, intra- and inter-op (default: one per core; on a busy machine 1 or 2 can be "
        "many times faster)",
        positive=True,
        identity=False,
        group="run",
    )
    progress: bool = option(True, "show progress bars", negate=True, identity=False, group="run")
