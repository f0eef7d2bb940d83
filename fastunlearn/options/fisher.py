"""The options of ``fastunlearn fisher``: the diagonal Fisher information of a model on a data set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastunlearn.fisher import FISHER_MODES, parse_bytes
from fastunlearn.models.precision import PRECISIONS
from fastunlearn.options.common import DataShape, ModelAccess, RunControl
from fastunlearn.options.schema import option, validate

__all__ = ["FisherConfig"]


@dataclass
class FisherConfig(RunControl, DataShape, ModelAccess):
    """Every option of a Fisher estimate."""

    data: Any = option(
        None,
        "the examples: a JSON Lines, Parquet or CSV file, a datasets folder or a Hub data set "
        "NAME[:CONFIG][@SPLIT]",
        path=True,
        required=True,
        group="data",
    )
    output: Any = option(None, "the .safetensors file to write", path="output", required=True)
    mode: str = option("per_example", "estimator", choices=FISHER_MODES)
    target_modules: list[str] | None = option(
        None,
        "layer names or suffixes, comma-separated (default: every linear layer but the output head)",
        metavar="NAME[,NAME...]",
    )
    batch_size: int = option(4, "examples per forward pass", positive=True)
    fisher_memory: int | str | None = option(
        None,
        "device memory for the accumulators of one group of layers, e.g. 4GiB; the data is passed once "
        "per group (default: what is free after the model and a pass's activations)",
        metavar="SIZE",
        check=lambda v: parse_bytes(v) and None,
    )
    dtype: str = option(
        "auto",
        "dtype the model is loaded in: auto = bf16 on CUDA GPUs of compute capability 8.0+, fp32 elsewhere; "
        "fp16 is refused (its gradients underflow without loss scaling)",
        choices=PRECISIONS,
    )
    overwrite: bool = option(False, "replace an existing --output", identity=False)

    def __post_init__(self) -> None:
        validate(self)
