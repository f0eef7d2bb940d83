"""The options of ``fastunlearn eval``: which evaluations run on a model, and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastunlearn.data import TEMPLATE_NAMES
from fastunlearn.options.common import ModelAccess, RunControl
from fastunlearn.options.schema import option, validate

__all__ = ["TOFU_MODES", "EvalConfig"]

TOFU_MODES = ("full", "legacy")


@dataclass
class EvalConfig(RunControl, ModelAccess):
    """Every option of an evaluation."""

    base_model: Any = option(
        None,
        "base model directory of a peft adapter MODEL (default: the one its adapter_config.json records)",
        path=True,
        group="model",
    )
    # TOFU
    tofu: Any = option(None, "directory of TOFU-format JSON Lines files", path=True, group="TOFU")
    forget_split: str | None = option(None, "forget split to use from --tofu, e.g. forget10", group="TOFU")
    forget: Any = option(None, "TOFU-format file of the forget set", path=True, group="TOFU")
    retain: Any = option(None, "TOFU-format file of the retain set", path=True, group="TOFU")
    real_authors: Any = option(None, "TOFU-format file of the real-authors set", path=True, group="TOFU")
    world_facts: Any = option(None, "TOFU-format file of the world-facts set", path=True, group="TOFU")
    mode: str = option(
        "full",
        "legacy: the paper's pipeline token for token (<=300 items, a tofu-* template, TOFU's tokenisation "
        "cut at 200 tokens, greedy to 200 tokens)",
        choices=TOFU_MODES,
        group="TOFU",
    )
    template: str | None = option(
        None,
        "prompt template the model was trained with (default: the run's, from the run_config.json beside an "
        "unlearned model; a bare model needs it)",
        choices=TEMPLATE_NAMES,
        group="TOFU",
    )
    reference_truth_ratios: Any = option(
        None,
        "retain-only model's truth ratios (JSON from --save-reference; same --mode and --template)",
        flag="--reference",
        path=True,
        group="TOFU",
    )
    save_reference: Any = option(
        None, "save this model's forget truth ratios (JSON)", path="output", group="TOFU"
    )
    max_items: int | None = option(
        None, "evaluate at most this many items per set", positive=True, group="TOFU"
    )
    max_new_tokens: int = option(200, "greedy answer length (full mode)", positive=True, group="TOFU")
    generate: bool = option(True, "generation (and ROUGE-L)", negate=True, group="TOFU")
    max_length: int | None = option(
        None,
        "token cap of a question + answer (default: the run's; else 512; legacy: 200)",
        positive=True,
        group="TOFU",
    )
    # extraction
    extraction: Any = option(None, 'data file of {"text"} sequences', path=True, group="extraction")
    n: int = option(10, "n-gram size of EL_n", positive=True, group="extraction")
    sequence_length: int = option(200, "tokens per sequence", positive=True, group="extraction")
    # how
    batch_size: int = option(16, "rows per forward pass", positive=True)
    device: str = option("auto", "cpu, cuda, cuda:1... (default: cuda when available)")
    output: Any = option(None, "write the results as JSON to this file", path="output")
    overwrite: bool = option(False, "replace an existing --output / --save-reference")

    def __post_init__(self) -> None:
        validate(self)
