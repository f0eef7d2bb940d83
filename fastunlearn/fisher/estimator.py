"""Diagonal empirical Fisher information of a model's linear layers, without per-example gradients.

For a linear layer and example ``n`` with inputs ``X_n`` and output gradients ``G_n`` of its loss
``L_n``, the weight gradient is ``g_n = G_nᵀ X_n`` and the diagonal empirical Fisher (Cha et al. 2025)
is ``F = (1/N) Σ_n g_n ⊙ g_n``: one backward of ``Σ_n L_n`` gives every ``G_n`` and folds
``Σ_n (G_nᵀ X_n)²`` into ``F`` (:mod:`fastunlearn.fisher.passes`). The square is inside the example
sum and outside the token sum; ``mode="token"`` squares per token, ``mode="batch"`` is the paper
code's ``Σ_b c_b·(∇L̄_b)² / Σ_b c_b`` (``L̄_b`` batch ``b``'s token-mean NLL, ``c_b`` its label
tokens). Under a memory budget the layers are split into groups whose fp32 accumulators fit, and the
data is passed once per group; a layer's estimate does not depend on the grouping.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn.engines import distributed
from fastunlearn.engines.distributed import linear_shape
from fastunlearn.fisher.budget import (
    FILA_ACCUMULATORS,
    available_memory,
    parse_bytes,
    plan_groups,
    resolve_budget,
)
from fastunlearn.fisher.estimate import FisherEstimate, FisherFile, FisherMode, check_finite, check_mode
from fastunlearn.fisher.layers import select_linear_layers
from fastunlearn.fisher.passes import Data, fisher_session, prepare_batches, run_pass
from fastunlearn.models.loading import is_quantized
from fastunlearn.ops._backend import Backend, resolve_backend


def measured_layers(
    model: nn.Module, target_modules: str | Sequence[str] | None, mode: str, backend: str
) -> dict[str, nn.Linear]:
    """The layers to measure, after checking everything about them that can fail before a pass."""
    check_mode(mode)
    layers = select_linear_layers(model, target_modules)
    for device in {layer.weight.device for layer in layers.values()}:
        resolve_backend(backend, device)  # an unusable backend fails now, not inside the backward
    for name, layer in layers.items():
        if not layer.weight.is_floating_point() and not is_quantized(layer):
            raise TypeError(
                f"layer {name!r} stores {layer.weight.dtype} weights (quantised?); cannot measure it"
            )
    return layers


def layer_estimates(
    model: nn.Module,
    batches: Mapping[str, Iterable[Mapping[str, Any]]],
    options: Mapping[str, Any],
    *,
    cpu_half: bool,
) -> tuple[dict[str, nn.Linear], dict[str, Data], Iterator[tuple[str, dict[str, Tensor], int]]]:
    """Everything checked before a pass: the measured layers, each data set of ``batches`` (label →
    batches) prepared, and a generator of ``(name, {label: estimate}, groups)`` per layer in the order
    of ``layers`` (scaled by its count, on the layers' device) as each group's passes end, its Fisher
    session open while the caller consumes it. ``options``: :func:`estimate_fisher`'s keyword arguments;
    without ``max_memory`` the CPU budget is half the host memory (``cpu_half``) or unlimited."""
    mode, backend = options["mode"], options["backend"]
    max_memory = options["max_memory"]
    budget = None if max_memory is None else parse_bytes(max_memory)
    layers = measured_layers(model, options["target_modules"], mode, backend)
    named = len(batches) > 1
    data = {label: prepare_batches(b, label if named else None) for label, b in batches.items()}
    sizes = {name: 4 * len(data) * math.prod(linear_shape(layer)) for name, layer in layers.items()}
    what = FILA_ACCUMULATORS if named else "fp32 accumulator"
    cpu = (lambda: available_memory(torch.device("cpu")) // 2) if cpu_half else lambda: sum(sizes.values())
    scale = {label: 1 / (d.num_tokens if mode == "batch" else d.num_examples) for label, d in data.items()}
    run = functools.partial(run_pass, model, mode=mode, backend=backend, progress=options["progress"])

    def passes() -> Iterator[tuple[str, dict[str, Tensor], int]]:
        with fisher_session(model, options["gradient_checkpointing"]):
            limit, origin = resolve_budget(
                budget, model, list(data.values()), layers, mode=mode, backend=backend, cpu_default=cpu
            )
            groups = plan_groups(sizes, limit, what=what, origin=origin)
            for index, group in enumerate(groups):
                part = f", layers {index + 1}/{len(groups)}" if len(groups) > 1 else ""
                subset = {name: layers[name] for name in group}
                sums = {label: run(d, subset, desc=f"Fisher ({label}){part}") for label, d in data.items()}
                for name in group:
                    yield (
                        name,
                        {label: sums[label].pop(name).mul_(scale[label]) for label in data},
                        len(groups),
                    )

    return layers, data, passes()


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    target_modules: str | Sequence[str] | None = None,
    mode: FisherMode = "per_example",
    backend: Backend = "auto",
    max_memory: int | str | None = None,
    gradient_checkpointing: bool | None = None,
    progress: bool = True,
) -> FisherEstimate:
    """Diagonal empirical Fisher of a causal LM's linear layers over ``batches`` (module docstring).

    ``batches``: dicts with ``input_ids`` and ``labels`` (``[B, T]``, ``-100`` = no loss, aligned as in
    Hugging Face), optionally ``attention_mask``, ``position_ids``; read once and kept.
    ``target_modules``: canonical names or dotted suffixes (default every ``nn.Linear`` but the head).
    ``max_memory``: bytes (or ``"4GiB"``) the accumulators may take at once; by default on CUDA what is
    free after the model and a pass's activations, on the CPU no limit. ``gradient_checkpointing``:
    recompute each decoder layer in the backward (``None``: as the model does).

    The passes run in eval mode with frozen weights, restored however the function exits. The result is
    on the layers' device when one group holds every layer, else on the CPU.
    """
    options = dict(target_modules=target_modules, mode=mode, backend=backend, max_memory=max_memory,
                   gradient_checkpointing=gradient_checkpointing, progress=progress)  # fmt: skip
    _, sets, estimates = layer_estimates(model, {mode: batches}, options, cpu_half=False)
    fisher: dict[str, Tensor] = {}
    with contextlib.closing(estimates):  # the session ends here whatever happens
        for name, tensors, groups in estimates:
            fisher[name] = tensors[mode].to("cpu") if groups > 1 else tensors[mode]
    check_finite(fisher, "the Fisher estimate")
    data = sets[mode]
    return FisherEstimate(fisher, num_examples=data.num_examples, num_tokens=data.num_tokens, mode=mode)


def save_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    target_modules: str | Sequence[str] | None = None,
    mode: FisherMode = "per_example",
    backend: Backend = "auto",
    max_memory: int | str | None = None,
    gradient_checkpointing: bool | None = None,
    progress: bool = True,
) -> FisherFile:
    """:func:`estimate_fisher` written to ``path`` (:class:`~.estimate.FisherFile`) as each group's
    pass ends, one layer in host memory at a time; returns the :class:`FisherFile`. On the CPU the default
    budget is half the available host memory. Every rank runs the passes; the main one writes.
    """
    options = dict(target_modules=target_modules, mode=mode, backend=backend, max_memory=max_memory,
                   gradient_checkpointing=gradient_checkpointing, progress=progress)  # fmt: skip
    layers, sets, estimates = layer_estimates(model, {mode: batches}, options, cpu_half=True)
    shapes = {name: linear_shape(layer) for name, layer in layers.items()}
    data = sets[mode]
    written = FisherFile(shapes, num_examples=data.num_examples, num_tokens=data.num_tokens, mode=mode)
    tensors = ((name, tensors[mode]) for name, tensors, _ in estimates)
    with contextlib.closing(estimates):
        if distributed.is_main():
            written.write(path, tensors, overwrite=overwrite)
        else:  # every rank drives the passes (their accumulators are all-reduced); the main one writes
            for name, tensor in tensors:
                check_finite({name: tensor}, "the Fisher estimate")
    return written
