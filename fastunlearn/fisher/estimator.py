"""Diagonal empirical Fisher information of a model's linear layers, without per-example gradients.

For an ``nn.Linear`` weight ``W ∈ R^{out×in}`` and example ``n`` with layer inputs ``X_n ∈ R^{T×in}``
(one row per token) and output gradients ``G_n ∈ R^{T×out}`` of that example's loss ``L_n``, the
chain rule through ``Y_n = X_n Wᵀ`` gives the example's weight gradient ``g_n = ∂L_n/∂W = G_nᵀ X_n``,
and the diagonal empirical Fisher (SPEC §3.1) is

    F = (1/N) Σ_n g_n ⊙ g_n.

Three observations make it cheap:

1. Examples in a batch do not interact, so the output gradients of the *summed* loss ``Σ_n L_n`` are,
   row block by row block, each example's own ``G_n``: one backward pass gives all of them.
2. The weight gradient itself is never needed. The weights are frozen, and an autograd function on
   each layer's output keeps ``X`` as a saved tensor and receives ``G`` in its backward, where
   :func:`fastunlearn.ops.grad_sq.per_example_grad_sq` folds ``Σ_n (G_nᵀ X_n)²`` straight into ``F``
   (:mod:`fastunlearn.fisher.passes`; this also makes activation checkpointing work).
3. That fold is a GEMM over ``B·T`` whose accumulator is squared after each example's ``T`` tokens;
   the Triton kernel (``fastunlearn.kernels.grad_sq``) does it in registers, never building the
   ``[B, out, in]`` per-example gradients that BackPACK, Opacus and ``torch.func`` build.

The square is outside the token sum and inside the example sum: attention mixes tokens, so the
"token-level" quantity ``Σ_{n,t} (G_n[t] ⊗ X_n[t])²`` (one matrix product, ``(G⊙G)ᵀ(X⊙X)``) is a
different estimator; it is offered only as ``mode="token"``.

``mode="batch"`` is the estimator of the paper's code: with ``L̄_b`` the token-mean NLL of batch ``b``
and ``c_b`` its number of label tokens, ``F = Σ_b c_b·(∇L̄_b)² / Σ_b c_b``.

Memory. The fp32 accumulators (4 bytes per measured weight) are the estimate's whole cost beyond a
training step's activations. Under a budget (``max_memory``) the layers are split into groups whose
accumulators fit it (:mod:`fastunlearn.fisher.budget`), the data is passed once per group, and each
finished group is scaled and moved to the CPU, so the device never holds more than one group — or,
with :func:`save_fisher`, written into the estimate's file one layer at a time, so the host never holds
the estimate either. The estimate of a layer does not depend on the grouping: its ``X`` and ``G`` are
computed by the same operations in every pass.
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
from fastunlearn.fisher.estimate import FISHER_MODES, FisherEstimate, FisherFile, FisherMode, _check_finite
from fastunlearn.fisher.layers import select_linear_layers
from fastunlearn.fisher.passes import Data, fisher_session, prepare_batches, run_pass
from fastunlearn.models.quantization import is_quantized
from fastunlearn.ops._backend import Backend, resolve_backend

__all__ = ["estimate_fisher", "save_fisher"]


def measured_layers(
    model: nn.Module, target_modules: str | Sequence[str] | None, mode: str, backend: str
) -> dict[str, nn.Linear]:
    """The layers to measure, after checking everything about them that can fail before a pass."""
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")
    layers = select_linear_layers(model, target_modules)
    for device in {layer.weight.device for layer in layers.values()}:
        resolve_backend(backend, device)  # an unusable backend fails now, not inside the backward
    for name, layer in layers.items():
        if not layer.weight.is_floating_point() and not is_quantized(layer):
            raise TypeError(
                f"layer {name!r} stores {layer.weight.dtype} weights (quantised?); cannot measure it"
            )
    return layers


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
    """Diagonal empirical Fisher of a causal LM's linear layers over ``batches`` (SPEC §3.1).

    Args:
        model: a ``transformers`` causal LM (anything returning ``.logits`` from ``input_ids``), plain
            or ``peft``-wrapped; for adapter layers the frozen base weight is measured.
        batches: iterable of dicts with ``input_ids`` and ``labels`` (``[B, T]``, ``-100`` = no loss,
            aligned with the inputs as in Hugging Face: the model's logit at ``t`` predicts ``t+1``) and
            optionally ``attention_mask``, ``position_ids``. Read once and kept (token ids only).
        target_modules: canonical names or dotted suffixes (``["q_proj", "v_proj"]``); ``None`` = every
            ``nn.Linear`` but the output embedding.
        mode: ``"per_example"`` — ``F = (1/N) Σ_n g_n²``, ``g_n`` the gradient of example ``n``'s
            summed token NLL, ``N`` the examples with at least one label; ``"batch"`` — the paper's
            ``Σ_b c_b (∇L̄_b)² / Σ_b c_b``; ``"token"`` — ``(1/N) Σ_{n,t} (G_n[t] ⊗ X_n[t])²``, the
            cheaper token-level quantity (a different estimator).
        backend: for :func:`per_example_grad_sq`.
        max_memory: bytes (``int`` or ``"4GiB"``-style string) the fp32 accumulators may take on the
            device at once. ``None``: on CUDA, what is free after the model and a pass's activations
            (:func:`~fastunlearn.fisher.budget.resolve_budget`); on the CPU no limit, since the result
            is held there anyway.
        gradient_checkpointing: recompute each decoder layer in the backward instead of keeping its
            activations; ``None`` follows the model (``transformers``' own setting). The estimate is
            the same either way.
        progress: show a ``tqdm`` progress bar.

    One forward and one backward per batch and group of layers, in eval mode (no dropout). The
    weights are frozen for the duration and no ``.grad`` is created; requires_grad flags, train/eval
    modes and hooks are restored however the function exits. The result is on the layers' device
    when one group holds every layer, on the CPU otherwise; :func:`save_fisher` writes it to a file
    instead, without ever holding it.

    Raises:
        ValueError: an unknown mode or target, a batch without ``input_ids``/``labels``, no label token
            in any batch, a budget too small for one layer's accumulator, non-finite values in the
            result.
    """
    _, data, estimates = _start(
        model, batches, target_modules, mode, backend, max_memory, gradient_checkpointing, progress,
        cpu_default=lambda sizes: sum(sizes.values()),
    )  # fmt: skip
    fisher: dict[str, Tensor] = {}
    with contextlib.closing(estimates):  # the session ends here whatever happens
        for name, tensor, groups in estimates:
            fisher[name] = tensor.to("cpu") if groups > 1 else tensor
    _check_finite(fisher, "the Fisher estimate")
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
    """:func:`estimate_fisher` written to ``path`` as it is computed, never held whole.

    The file holds what :meth:`FisherEstimate.save` writes — the same tensors and metadata, read alike
    by :meth:`FisherEstimate.load` and ``safetensors`` (:class:`~fastunlearn.fisher.estimate.FisherFile`
    says how): its header is written first, from the layers' shapes and the data's counts, and each
    group's layers are appended as their pass ends, one layer in host memory at a time; the file is
    renamed into place when the last layer is in (``FileExistsError``, before any pass, unless
    ``overwrite``). The device holds one group's accumulators (``max_memory``; on CUDA by default what
    is free after the model and a pass's activations), so beyond the model a CUDA run holds one layer
    of the estimate in host memory. On the CPU the accumulators are host memory: the default budget
    is half the available host memory, as :func:`~fastunlearn.fisher.fila_row_weights`' (one group,
    one pass, when it fits). Arguments and errors as :func:`estimate_fisher`'s; a non-finite layer
    stops the write and leaves ``path`` untouched. Returns the written file's :class:`FisherFile`
    (layer shapes and counts). Under several processes every rank runs the passes and the main one
    writes.
    """
    layers, data, estimates = _start(
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
                _check_finite({name: tensor}, "the Fisher estimate")
    return written


def _start(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    target_modules: str | Sequence[str] | None,
    mode: str,
    backend: str,
    max_memory: int | str | None,
    gradient_checkpointing: bool | None,
    progress: bool,
    *,
    cpu_default: Callable[[Mapping[str, int]], int],
) -> tuple[Mapping[str, nn.Linear], Data, Iterator[tuple[str, Tensor, int]]]:
    """The measured layers, the prepared data and the generator of :func:`_layer_estimates` (not
    started: its session opens at the first ``next``)."""
    budget_bytes = None if max_memory is None else parse_bytes(max_memory)
    layers = measured_layers(model, target_modules, mode, backend)
    data = prepare_batches(batches)
    estimates = _layer_estimates(
        model,
        layers,
        data,
        mode=mode,
        backend=backend,
        max_memory=budget_bytes,
        gradient_checkpointing=gradient_checkpointing,
        progress=progress,
        cpu_default=cpu_default,
    )
    return layers, data, estimates


def _layer_estimates(
    model: nn.Module,
    layers: Mapping[str, nn.Linear],
    data: Data,
    *,
    mode: str,
    backend: str,
    max_memory: int | None,
    gradient_checkpointing: bool | None,
    progress: bool,
    cpu_default: Callable[[Mapping[str, int]], int],
) -> Iterator[tuple[str, Tensor, int]]:
    """Each layer's finished estimate (scaled, on the layers' device) in the order of ``layers``, group
    by group as the passes end, with the number of groups. The Fisher session (frozen weights, hooks)
    is open while the caller consumes them; ``cpu_default(sizes)``: the budget on the CPU without
    ``max_memory`` (bytes), from each layer's accumulator bytes."""
    sizes = {name: 4 * math.prod(linear_shape(layer)) for name, layer in layers.items()}
    with fisher_session(model, gradient_checkpointing):
        budget, origin = resolve_budget(
            max_memory,
            model,
            [data],
            layers,
            mode=mode,
            backend=backend,
            cpu_default=lambda: cpu_default(sizes),
        )
        groups = plan_groups(sizes, budget, what="fp32 accumulator", origin=origin)
        scale = 1.0 / (data.num_tokens if mode == "batch" else data.num_examples)
        for index, group in enumerate(groups):
            desc = f"Fisher ({mode})" + (f", layers {index + 1}/{len(groups)}" if len(groups) > 1 else "")
            group_layers = {name: layers[name] for name in group}
            sums = run_pass(
                model, data, group_layers, mode=mode, backend=backend, progress=progress, desc=desc
            )
            for name in group:
                yield name, sums.pop(name).mul_(scale), len(groups)
