"""FILA's row weights ``d_i = sqrt(Σ_j F_f,ij / (F_r,ij + ε))`` (Cha et al. 2025), computed without ever
holding a whole model's Fisher: about 5 MB for Llama-2-7B against 52 GB of estimates. The accumulators of
one group of layers at a time are filled, reduced to ``d`` and freed; a layer's do not depend on the
grouping, so ``d`` equals that of two whole-model estimates."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn.engines import distributed
from fastunlearn.fisher.estimate import (
    FisherMode,
    LayerTable,
    check_finite,
    check_mode,
    layer_estimates,
    read_tagged_safetensors,
)
from fastunlearn.ops._backend import Backend

FORMAT = "fastunlearn.fila_row_weights"
FORMAT_VERSION = "1"
_COUNTS = ("forget_examples", "forget_tokens", "retain_examples", "retain_tokens")


def check_eps(eps: Any) -> float:
    """``eps`` as a float; ``ValueError`` unless it is a positive finite number."""
    if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def row_weight(forget: Tensor, retain: Tensor, eps: float, *, in_place: bool = False) -> Tensor:
    """``d_i = sqrt(Σ_j F_f,ij / (F_r,ij + ε))`` of one layer in fp32; ``in_place``: overwrite the fp32
    estimates instead of allocating two more layer-sized tensors (the same bits)."""
    relative = forget.div_(retain.add_(eps)) if in_place else forget.float() / (retain.float() + eps)
    return relative.sum(dim=1).sqrt()


class FilaRowWeights(LayerTable):
    """FILA's row weights: canonical layer name → fp32 ``d`` ``[out]``, with the ``eps`` they were
    computed with (:func:`fila_init` uses it again in ``1/(d + ε)``), the Fisher ``mode`` (or ``None``)
    and the ``counts`` known of ``forget_examples``, ``forget_tokens``, ``retain_examples``,
    ``retain_tokens``."""

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        *,
        eps: float,
        mode: str | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        if mode is not None:
            check_mode(mode)
        unknown = sorted(set(counts or {}) - set(_COUNTS))
        if unknown:
            raise ValueError(f"unknown count(s) {unknown}; expected some of {list(_COUNTS)}")
        super().__init__(weights, "row_weights", dim=1)
        self.eps = check_eps(eps)
        self.mode = mode
        self.counts = {k: int(v) for k, v in (counts or {}).items()}

    @classmethod
    def from_fisher(
        cls, forget: Mapping[str, Tensor], retain: Mapping[str, Tensor], *, eps: float = 1e-5
    ) -> FilaRowWeights:
        """The row weights of two whole estimates (every layer the forget estimate covers); mode and
        counts are taken from :class:`~fastunlearn.fisher.FisherEstimate` arguments."""
        eps = check_eps(eps)
        missing = sorted(name for name in forget if name not in retain)
        if missing:
            raise ValueError(f"the retain Fisher estimate has no entry for {missing[:8]}")
        weights = {}
        for name, f in forget.items():
            r = retain[name]
            if f.shape != r.shape:
                raise ValueError(
                    f"layer {name!r}: forget Fisher {tuple(f.shape)} and retain {tuple(r.shape)} differ"
                )
            weights[name] = row_weight(f, r, eps)
        modes = {getattr(forget, "mode", None), getattr(retain, "mode", None)}
        counts = {}
        for what, estimate in (("forget", forget), ("retain", retain)):
            if hasattr(estimate, "num_examples"):
                counts[f"{what}_examples"] = estimate.num_examples
                counts[f"{what}_tokens"] = estimate.num_tokens
        return cls(weights, eps=eps, mode=modes.pop() if len(modes) == 1 else None, counts=counts)

    def __repr__(self) -> str:
        return f"FilaRowWeights({len(self)} layers, eps={self.eps}, mode={self.mode!r}, counts={self.counts})"

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a safetensors file (the ``d`` tensors plus eps/mode/counts metadata), atomically."""
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "eps": repr(self.eps)}
        if self.mode is not None:
            metadata["mode"] = self.mode
        metadata.update({k: str(v) for k, v in self.counts.items()})
        self._save(path, metadata, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> FilaRowWeights:
        """Read a file written by :meth:`save`; ``ValueError`` if it is not one."""
        weights, metadata = read_tagged_safetensors(
            path, FORMAT, FORMAT_VERSION, what="FILA row-weights", device=device
        )
        try:
            eps = float(metadata["eps"])
            counts = {k: int(metadata[k]) for k in _COUNTS if k in metadata}
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: malformed row-weights metadata {metadata}") from err
        return cls(weights, eps=eps, mode=metadata.get("mode"), counts=counts)


def fila_row_weights(
    model: nn.Module,
    forget: Iterable[Mapping[str, Any]],
    retain: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Sequence[str] | None = None,
    mode: FisherMode = "per_example",
    eps: float = 1e-5,
    backend: Backend = "auto",
    max_memory: int | str | None = None,
    gradient_checkpointing: bool | None = None,
    progress: bool = True,
) -> FilaRowWeights:
    """``FilaRowWeights.from_fisher(estimate_fisher(model, forget), estimate_fisher(model, retain),
    eps=eps)`` without holding either estimate: one pass of each data set per group of layers whose
    forget and retain fp32 accumulators (8 bytes per weight) fit ``max_memory`` (by default, on the CPU,
    half the available host memory). Other arguments and errors as :func:`estimate_fisher`'s; under
    ``torchrun`` every rank returns rank 0's ``d``.
    """
    eps = check_eps(eps)
    options = dict(target_modules=target_modules, mode=mode, backend=backend, max_memory=max_memory,
                   gradient_checkpointing=gradient_checkpointing, progress=progress)  # fmt: skip
    batches = {"forget": forget, "retain": retain}
    _, data, estimates = layer_estimates(model, batches, options, cpu_half=True)
    weights: dict[str, Tensor] = {}
    with contextlib.closing(estimates):  # the session ends here whatever happens
        for name, fisher, _ in estimates:
            check_finite({name: fisher["forget"]}, "the forget Fisher estimate")
            check_finite({name: fisher["retain"]}, "the retain Fisher estimate")
            # Rank 0's d on every rank: FILA's factors are then computed from the same bits.
            row = row_weight(fisher.pop("forget"), fisher.pop("retain"), eps, in_place=True)
            weights[name] = distributed.broadcast(row).to("cpu")
    counts = {}
    for what, d in data.items():
        counts[f"{what}_examples"], counts[f"{what}_tokens"] = d.num_examples, d.num_tokens
    return FilaRowWeights(weights, eps=eps, mode=mode, counts=counts)
