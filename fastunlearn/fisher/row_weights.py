"""FILA's row weights, computed without ever holding a whole model's Fisher information (SPEC §3.2).

FILA needs from the two Fisher estimates only, per layer ``W ∈ R^{out×in}``, the row weights

    d_i = sqrt( Σ_j F_f,ij / (F_r,ij + ε) )         (one fp32 number per output row)

``F_f``, ``F_r`` being the forget and retain estimates, each normalised by its own count. A layer's
``d`` is ``out`` numbers where its estimates are ``2·out·in``: 2.3 MB for all of Llama-2-7B's linear
layers against 52 GB of estimates. :func:`fila_row_weights` therefore computes them group by group:
the layers are split into runs whose forget and retain accumulators (8 bytes per weight) fit a memory
budget (:mod:`fastunlearn.fisher.budget`); for each group one pass of the forget and one of the retain
data fill the accumulators (:mod:`fastunlearn.fisher.passes`), which are reduced to ``d`` and freed
before the next group. The result, :class:`FilaRowWeights`, is what :func:`fastunlearn.fisher.fila_init`
needs (``row_weights=``) and what a run keeps to resume.

The reduction is :func:`row_weight`, the one definition of ``d`` (:func:`fila_init` given two estimates
uses it too), and a layer's accumulators are the same whatever the grouping, so the streamed ``d``
equals the ``d`` of two whole-model estimates.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn._io import atomic_file
from fastunlearn.engines import distributed
from fastunlearn.fisher.budget import (
    FILA_ACCUMULATORS,
    available_memory,
    fila_accumulator_bytes,
    parse_bytes,
    plan_groups,
    resolve_budget,
)
from fastunlearn.fisher.estimate import FISHER_MODES, FisherMode, _check_finite, read_tagged_safetensors
from fastunlearn.fisher.estimator import measured_layers
from fastunlearn.fisher.passes import fisher_session, prepare_batches, run_pass
from fastunlearn.models.naming import canonical_name
from fastunlearn.ops._backend import Backend

FORMAT = "fastunlearn.fila_row_weights"
FORMAT_VERSION = "1"
_COUNTS = ("forget_examples", "forget_tokens", "retain_examples", "retain_tokens")

__all__ = ["FilaRowWeights", "check_eps", "fila_row_weights", "row_weight"]


def check_eps(eps: Any) -> float:
    """``eps`` as a float; ``ValueError`` unless it is a positive finite number."""
    if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def row_weight(forget: Tensor, retain: Tensor, eps: float, *, in_place: bool = False) -> Tensor:
    """``d_i = sqrt(Σ_j F_f,ij / (F_r,ij + ε))`` of one layer, in fp32 where the estimates are.

    ``in_place``: use the fp32 estimates as scratch (they are overwritten) instead of allocating two
    more layer-sized tensors; the result is bit for bit the same.
    """
    if in_place:
        if forget.dtype != torch.float32 or retain.dtype != torch.float32:
            raise TypeError("row_weight(in_place=True) needs fp32 estimates")
        relative = forget.div_(retain.add_(eps))
    else:
        relative = forget.float() / (retain.float() + eps)
    return relative.sum(dim=1).sqrt()


class FilaRowWeights(Mapping[str, Tensor]):
    """FILA's row weights: canonical layer name → fp32 ``d`` of shape ``[out]`` (module docstring).

    Attributes:
        eps: the ``ε`` of ``F_f / (F_r + ε)`` they were computed with (:func:`fila_init` uses it again
            in ``1/(d + ε)``).
        mode: the Fisher estimator (``"per_example"``, ``"batch"``, ``"token"``), or ``None`` if unknown.
        counts: ``forget_examples``, ``forget_tokens``, ``retain_examples``, ``retain_tokens`` of the
            estimates (those known).

    Keys are canonical names (:func:`canonical_name`); lookups accept peft-style names too. Saved as
    safetensors with the attributes in its metadata (:meth:`save`, :meth:`load`).
    """

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        *,
        eps: float,
        mode: str | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        if mode is not None and mode not in FISHER_MODES:
            raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")
        unknown = sorted(set(counts or {}) - set(_COUNTS))
        if unknown:
            raise ValueError(f"unknown count(s) {unknown}; expected some of {list(_COUNTS)}")
        self._weights: dict[str, Tensor] = {}
        for name, d in weights.items():
            if not isinstance(d, Tensor) or not d.is_floating_point() or d.dim() != 1:
                raise TypeError(f"row weights of {name!r} must be a 1-D floating-point tensor")
            key = canonical_name(name)
            if key in self._weights:
                raise ValueError(f"row weights {name!r} and another both map to layer {key!r}")
            self._weights[key] = d.float()
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

    def __getitem__(self, name: str) -> Tensor:
        return self._weights[canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_name(name) in self._weights

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __repr__(self) -> str:
        return f"FilaRowWeights({len(self)} layers, eps={self.eps}, mode={self.mode!r}, counts={self.counts})"

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write a safetensors file (the ``d`` tensors plus eps/mode/counts metadata), atomically."""
        from safetensors.torch import save_file

        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "eps": repr(self.eps)}
        if self.mode is not None:
            metadata["mode"] = self.mode
        metadata.update({k: str(v) for k, v in self.counts.items()})
        tensors = {n: d.detach().to("cpu").contiguous() for n, d in self._weights.items()}
        atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)

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
    """FILA's row weights ``d`` of the model's linear layers from a forget and a retain data set,
    streamed group by group under a memory budget (module docstring; SPEC §3.1–3.2).

    Equal to ``FilaRowWeights.from_fisher(estimate_fisher(model, forget), estimate_fisher(model,
    retain), eps=eps)`` with the same options, without holding either estimate.

    Args:
        model, target_modules, mode, backend, gradient_checkpointing, progress: as for
            :func:`~fastunlearn.fisher.estimate_fisher`.
        forget, retain: iterables of batches (dicts with ``input_ids`` and ``labels``), each read once
            and kept (token ids only) for the passes of every group.
        eps: ``ε`` of ``F_f / (F_r + ε)``.
        max_memory: bytes (``int`` or ``"4GiB"``-style string) the forget and retain fp32 accumulators
            of one group may take (8 bytes per weight). ``None``: on CUDA, what is free after the model
            and a pass's activations; on the CPU, half of the available host memory.

    Two passes (forget, retain) per group, each one forward and one backward per batch. Under
    ``torchrun`` the ranks share the batches and sum their accumulators
    (:func:`~fastunlearn.fisher.passes.run_pass`); every rank returns rank 0's ``d``.

    Raises:
        ValueError: as :func:`estimate_fisher`; a budget too small for one layer (naming the layer and
            the bytes it needs), checked before any pass; non-finite estimates (naming the layer).
    """
    eps = check_eps(eps)
    budget_bytes = None if max_memory is None else parse_bytes(max_memory)
    layers = measured_layers(model, target_modules, mode, backend)
    data = {"forget": prepare_batches(forget, "forget"), "retain": prepare_batches(retain, "retain")}
    sizes = fila_accumulator_bytes(layers)
    scale = {what: 1.0 / (d.num_tokens if mode == "batch" else d.num_examples) for what, d in data.items()}
    weights: dict[str, Tensor] = {}
    with fisher_session(model, gradient_checkpointing):
        budget, origin = resolve_budget(
            budget_bytes,
            model,
            list(data.values()),
            layers,
            mode=mode,
            backend=backend,
            cpu_default=lambda: available_memory(torch.device("cpu")) // 2,
        )
        groups = plan_groups(sizes, budget, what=FILA_ACCUMULATORS, origin=origin)
        for index, group in enumerate(groups):
            group_layers = {name: layers[name] for name in group}
            sums = {}
            for what in ("forget", "retain"):
                desc = f"Fisher ({what})" + (f", layers {index + 1}/{len(groups)}" if len(groups) > 1 else "")
                sums[what] = run_pass(
                    model,
                    data[what],
                    group_layers,
                    mode=mode,
                    backend=backend,
                    progress=progress,
                    desc=desc,
                )
            for name in group:
                f = sums["forget"].pop(name).mul_(scale["forget"])
                r = sums["retain"].pop(name).mul_(scale["retain"])
                _check_finite({name: f}, "the forget Fisher estimate")
                _check_finite({name: r}, "the retain Fisher estimate")
                # Rank 0's d on every rank: FILA's factors are then computed from the same bits.
                weights[name] = distributed.broadcast(row_weight(f, r, eps, in_place=True)).to("cpu")
                del f, r
    counts = {}
    for what, d in data.items():
        counts[f"{what}_examples"], counts[f"{what}_tokens"] = d.num_examples, d.num_tokens
    return FilaRowWeights(weights, eps=eps, mode=mode, counts=counts)
