"""Diagonal empirical Fisher information of a model's linear layers, without per-example gradients.

For a linear layer and example ``n`` with inputs ``X_n ∈ R^{T×in}`` and output gradients
``G_n ∈ R^{T×out}`` of its loss ``L_n``, the weight gradient is ``g_n = G_nᵀ X_n`` and the diagonal
empirical Fisher (Cha et al. 2025, arXiv 2408.06621) is ``F = (1/N) Σ_n g_n ⊙ g_n``. One backward of
``Σ_n L_n`` yields every ``G_n`` (examples do not interact), and the backward itself folds
``Σ_n (G_nᵀ X_n)²`` into ``F`` (:mod:`fastunlearn.fisher.passes`), so no weight gradient is formed.
The square is inside the example sum and outside the token sum; the token-level
``Σ_{n,t} (G_n[t] ⊗ X_n[t])²`` is a different estimator, ``mode="token"``. ``mode="batch"`` is the
paper code's ``Σ_b c_b·(∇L̄_b)² / Σ_b c_b`` (``L̄_b`` the token-mean NLL of batch ``b``, ``c_b`` its
label tokens).

The fp32 accumulators (4 bytes per measured weight) are the cost beyond a training step. Under a budget
the layers are split into groups whose accumulators fit (:mod:`fastunlearn.fisher.budget`) and the data
is passed once per group; a layer's estimate does not depend on the grouping.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn.engines import distributed
from fastunlearn.engines.sharded import linear_shape
from fastunlearn.fisher.budget import available_memory, parse_bytes, plan_groups, resolve_budget
from fastunlearn.fisher.estimate import FisherEstimate, FisherFile, FisherMode, check_finite, check_mode
from fastunlearn.fisher.layers import select_linear_layers
from fastunlearn.fisher.passes import Data, fisher_session, prepare_batches, run_pass
from fastunlearn.models.quantization import is_quantized
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
    layers: Mapping[str, nn.Linear],
    data: Mapping[str, Data],
    sizes: Mapping[str, int],
    *,
    mode: str,
    backend: str,
    max_memory: int | None,
    gradient_checkpointing: bool | None,
    progress: bool,
    what: str,
    cpu_default: Callable[[], int],
) -> Iterator[tuple[str, dict[str, Tensor], int]]:
    """``(name, {label: estimate}, groups)`` for each layer in the order of ``layers``: its finished
    estimate on each data set of ``data`` (label → data; scaled by its count, on the layers' device),
    group by group as the passes end. ``sizes``: each layer's accumulator bytes, which are ``what``;
    ``cpu_default()``: the budget on the CPU without ``max_memory``. The Fisher session is open while
    the caller consumes the generator."""
    with fisher_session(model, gradient_checkpointing):
        data_sets = list(data.values())
        budget, origin = resolve_budget(
            max_memory, model, data_sets, layers, mode=mode, backend=backend, cpu_default=cpu_default
        )
        groups = plan_groups(sizes, budget, what=what, origin=origin)
        scale = {
            label: 1.0 / (d.num_tokens if mode == "batch" else d.num_examples) for label, d in data.items()
        }
        for index, group in enumerate(groups):
            part = f", layers {index + 1}/{len(groups)}" if len(groups) > 1 else ""
            subset = {name: layers[name] for name in group}
            sums = {
                label: run_pass(
                    model,
                    d,
                    subset,
                    mode=mode,
                    backend=backend,
                    progress=progress,
                    desc=f"Fisher ({label}){part}",
                )
                for label, d in data.items()
            }
            for name in group:
                yield name, {label: sums[label].pop(name).mul_(scale[label]) for label in data}, len(groups)


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
    _, data, estimates = _estimates(
        model, batches, target_modules, mode, backend, max_memory, gradient_checkpointing, progress,
        cpu_default=lambda sizes: sum(sizes.values()),
    )  # fmt: skip
    fisher: dict[str, Tensor] = {}
    with contextlib.closing(estimates):  # the session ends here whatever happens
        for name, tensor, groups in estimates:
            fisher[name] = tensor.to("cpu") if groups > 1 else tensor
    check_finite(fisher, "the Fisher estimate")
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
    layers, data, estimates = _estimates(
        model, batches, target_modules, mode, backend, max_memory, gradient_checkpointing, progress,
        cpu_default=lambda sizes: available_memory(torch.device("cpu")) // 2,
    )  # fmt: skip
    shapes = {name: linear_shape(layer) for name, layer in layers.items()}
    written = FisherFile(shapes, num_examples=data.num_examples, num_tokens=data.num_tokens, mode=mode)
    with contextlib.closing(estimates):
        if distributed.is_main():
            written.write(path, ((name, tensor) for name, tensor, _ in estimates), overwrite=overwrite)
        else:  # every rank drives the passes (their accumulators are all-reduced); the main one writes
            for name, tensor, _ in estimates:
                check_finite({name: tensor}, "the Fisher estimate")
    return written


def _estimates(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    target_modules: str | Sequence[str] | None,
    mode: str,
    backend: str,
    max_memory: int | str | None,
    gradient_checkpointing: bool | None,
    progress: bool,
    cpu_default: Callable[[Mapping[str, int]], int],
) -> tuple[Mapping[str, nn.Linear], Data, Iterator[tuple[str, Tensor, int]]]:
    """The measured layers, the prepared data and ``(name, estimate, groups)`` per layer (a generator:
    its session opens at the first ``next``); ``cpu_default(sizes)``: the budget on the CPU."""
    budget = None if max_memory is None else parse_bytes(max_memory)
    layers = measured_layers(model, target_modules, mode, backend)
    data = prepare_batches(batches)
    sizes = {name: 4 * math.prod(linear_shape(layer)) for name, layer in layers.items()}
    options = {"max_memory": budget, "gradient_checkpointing": gradient_checkpointing, "progress": progress}
    estimates = layer_estimates(
        model, layers, {mode: data}, sizes, mode=mode, backend=backend, what="fp32 accumulator",
        cpu_default=lambda: cpu_default(sizes), **options,
    )  # fmt: skip
    return layers, data, ((name, tensors[mode], groups) for name, tensors, groups in estimates)
