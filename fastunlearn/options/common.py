"""Option groups shared by several commands: the model, how records become token sequences, how a
command runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastunlearn.data import FORMATS, TEMPLATE_NAMES
from fastunlearn.models.loading import require_bitsandbytes
from fastunlearn.options.schema import option


@dataclass
class ModelAccess:
    """The model a command works on, and what loading it may do."""

    model: Any = option(
        None, "a model or peft adapter directory, or a Hub id; in Python also a loaded causal LM", flag="",
        path=True, plan=True,
    )  # fmt: skip
    tokenizer: Any = option(None, "tokenizer directory (default: the model's)", path=True, group="model")
    trust_remote_code: bool = option(
        False, "allow the model's own Python code to run", identity=False, plan=True, group="model"
    )
    allow_download: bool = option(
        False, "fetch from the Hugging Face Hub what the local cache lacks", identity=False, group="model"
    )
    revision: str | None = option(None, "branch, tag or commit of a Hub MODEL (default: main)", group="model")
    load_in_4bit: bool = option(
        False, "load the base weights in 4 bits (bitsandbytes NF4; QLoRA)",
        check=lambda on: on and require_bitsandbytes("load_in_4bit"), plan=True, group="model",
    )  # fmt: skip
    load_in_8bit: bool = option(
        False, "load the base weights in 8 bits (bitsandbytes LLM.int8())",
        check=lambda on: on and require_bitsandbytes("load_in_8bit"), plan=True, group="model",
    )  # fmt: skip

    def loading_options(self) -> dict[str, Any]:
        """The keyword arguments of ``load_model_and_tokenizer`` these options set."""
        names = ("trust_remote_code", "allow_download", "revision", "load_in_4bit", "load_in_8bit")
        return {name: getattr(self, name) for name in names}

    @property
    def quantised(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class DataShape:
    """How data records become token sequences."""

    template: str = option(
        "plain", "prompt template of question/answer records (tofu-*: TOFU's own tokenisation)",
        choices=TEMPLATE_NAMES, group="data",
    )  # fmt: skip
    data_format: str = option(
        "auto", "record format of the data files (auto: detected per file)", flag="--format",
        choices=("auto", *FORMATS), group="data",
    )  # fmt: skip
    max_length: int = option(512, "token cap per example", positive=True, plan=True, group="data")


@dataclass
class RunControl:
    """How a command runs, never what it computes."""

    threads: int | None = option(
        None, "PyTorch CPU threads (default: one per core)", positive=True, identity=False, group="run"
    )
    progress: bool = option(True, "show progress bars", negate=True, identity=False, group="run")
