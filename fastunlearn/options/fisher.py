"""The options of ``fastunlearn fisher``: the diagonal Fisher information of a model on a data set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastunlearn.fisher import FISHER_MODES, parse_bytes
from fastunlearn.models.devices import PRECISIONS
from fastunlearn.options.common import DataShape, ModelAccess, RunControl
from fastunlearn.options.schema import Validated, option


@dataclass
class FisherConfig(RunControl, DataShape, ModelAccess, Validated):
    """Every option of a Fisher estimate."""

    data: Any = option(
        None, "the examples: a JSON Lines, Parquet or CSV file, a datasets folder or a Hub data set",
        path=True, required=True, group="data",
    )  # fmt: skip
    output: Any = option(None, "the .safetensors file to write", path="output", required=True)
    mode: str = option("per_example", "estimator", choices=FISHER_MODES)
    target_modules: list[str] | None = option(
        None, "layer names or suffixes (default: every linear layer but the output head)",
        metavar="NAME[,NAME...]",
    )  # fmt: skip
    batch_size: int = option(4, "examples per forward pass", positive=True)
    fisher_memory: int | str | None = option(
        None, "device memory for one group of accumulators, e.g. 4GiB (default: what is free)",
        metavar="SIZE", check=parse_bytes,
    )  # fmt: skip
    dtype: str = option(
        "auto", "dtype the model is loaded in (auto: bf16 on CUDA GPUs that support it, else fp32)",
        choices=PRECISIONS,
    )  # fmt: skip
    overwrite: bool = option(False, "replace an existing --output", identity=False)
