"""IHL and NLL straight from the last hidden states, the logits never whole (the "fused linear" loss of
Liger-Kernel and Cut Cross-Entropy, here also for the Inverted Hinge Loss of Cha et al. 2025).

A chunk of tokens' logits is computed, the row kernels give its loss and write its gradient over it,
and the gradient is folded into ``∂h``, ``∂W``, ``∂b`` before the next chunk. For ``"mean"``/``"sum"``
the gradients are formed in the forward (as Liger-Kernel does) and the backward scales them by
``grad_output``; for ``"none"`` (per-token weights known only in the backward) the backward recomputes
each chunk's logits (as Cut Cross-Entropy does). Logits stay in the inputs' dtype, statistics and
``∂W``, ``∂b`` accumulate in fp32; under autocast the inputs are cast as ``F.linear`` casts them.

The custom operator ``fastunlearn::fused_linear_row_loss`` returns ``(value, stats, argmax, ∂h, ∂W, ∂b,
workspace)``, the gradients those ``needs`` names; its workspace is :mod:`fastunlearn.ops._backend`'s.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastunlearn.ops._backend import Backend, compute_dtype, resolve_backend
from fastunlearn.ops._ihl_torch import implementation, valid_targets
from fastunlearn.ops._linear_chunks import ChunkScratch, check_head, input_grads, map_chunks
from fastunlearn.ops.ihl import _check_labels, _check_reduction, fake_rows, row_loss

# Logits per chunk: on a GPU 64M (256 MB in fp32) keeps the chunk's matmuls at full rate; on CPU a few
# hundred rows already are, so 8M.
CHUNK_ELEMENTS = 1 << 26
CPU_CHUNK_ELEMENTS = 1 << 23


def resolve_chunk_rows(chunk_rows: int | None, device: torch.device, vocab: int) -> int:
    """Rows per chunk: ``chunk_rows`` (checked), or about ``(CPU_)CHUNK_ELEMENTS`` logits."""
    if chunk_rows is None:
        budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS
        return max(1, budget // vocab)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    return chunk_rows


def input_needs(*tensors: Tensor | None) -> list[bool]:
    """Which of the tensors an operator must return a gradient for (none under ``no_grad``)."""
    return [torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors]


@torch.library.custom_op("fastunlearn::fused_linear_row_loss", mutates_args=())
def fused_linear_row_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    loss: str,
    ignore_index: int,
    reduction: str,
    backend: str,
    chunk_rows: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = implementation(backend, "ihl")
    with torch.autocast(hidden.device.type, enabled=False):
        # 1/count of the mean, in the losses' dtype; a device tensor, no host synchronisation.
        count = valid_targets(labels, weight.shape[0], ignore_index).sum().clamp_min(1)
        count = count.to(compute_dtype(hidden))
        scale = count.reciprocal() if reduction == "mean" else torch.ones_like(count)
        scratch = ChunkScratch(hidden, weight, bias, chunk_rows, needs)
        outs = []
        for r0, h_chunk, logits in scratch.chunks(hidden):
            rows, y = logits.unsqueeze(0), labels[r0 : r0 + h_chunk.shape[0]]
            out = impl.ihl_forward(rows, y, ignore_index, loss=loss)
            outs.append(out)
            if any(needs):
                impl.ihl_backward(rows, y, out[1], out[2], scale, rows, ignore_index)  # in place
                scratch.fold(r0, h_chunk, logits)
        losses, stats, argmax = (torch.cat(parts) for parts in zip(*outs))
    value = losses if reduction == "none" else losses.sum() * scale
    return value, stats, argmax, *scratch.outputs()


@fused_linear_row_loss.register_fake
def _(hidden, weight, bias, labels, loss, ignore_index, reduction, backend, chunk_rows, needs):
    scratch = ChunkScratch(hidden, weight, bias, chunk_rows, needs)
    value, stats, argmax = fake_rows(hidden, hidden.shape[0], backend)
    if reduction != "none":
        value = hidden.new_empty((), dtype=torch.promote_types(value.dtype, compute_dtype(hidden)))
    return value, stats, argmax, *scratch.outputs()


@torch.library.custom_op("fastunlearn::fused_linear_row_loss_backward", mutates_args=())
def fused_linear_row_loss_backward(
    grad_rows: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    stats: Tensor,
    argmax: Tensor,
    ignore_index: int,
    backend: str,
    chunk_rows: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = implementation(backend, "ihl")
    grad_rows = grad_rows.to(stats.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        scratch = ChunkScratch(hidden, weight, bias, chunk_rows, needs)
        for r0, h_chunk, logits in scratch.chunks(hidden):
            r1, rows = r0 + h_chunk.shape[0], logits.unsqueeze(0)
            impl.ihl_backward(
                rows, labels[r0:r1], stats[r0:r1], argmax[r0:r1], grad_rows[r0:r1], rows, ignore_index
            )
            scratch.fold(r0, h_chunk, logits)
    return scratch.outputs()


@fused_linear_row_loss_backward.register_fake
def _(grad_rows, hidden, weight, bias, labels, stats, argmax, ignore_index, backend, chunk_rows, needs):
    scratch = ChunkScratch(hidden, weight, bias, chunk_rows, needs)
    return scratch.outputs()


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, _, ignore_index, reduction, backend, chunk_rows, _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.options = (reduction == "none", ignore_index, backend, chunk_rows, weight.dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels, *output[1:3])  # the row statistics
    else:
        ctx.save_for_backward(*output[3:6])  # the gradients


def _backward(ctx, grad_value: Tensor, *_unused):
    per_token, ignore_index, backend, chunk_rows, weight_dtype = ctx.options
    needs = ctx.needs_input_grad[:3]
    if per_token:
        args = (grad_value, *ctx.saved_tensors, ignore_index, backend, chunk_rows, list(needs))
        dh, dw, db = input_grads(fused_linear_row_loss_backward(*args), needs, weight_dtype)
    else:  # formed in the forward: only grad_output's scale is missing
        dh, dw, db = input_grads(ctx.saved_tensors, needs, weight_dtype, grad_value)
    return dh, dw, db, None, None, None, None, None, None, None


fused_linear_row_loss.register_autograd(_backward, setup_context=_setup_context)


def _checked_inputs(
    name: str,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    backend: str,
    chunk_rows: int | None,
    validate: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, str, int]:
    """The ``[N, H]`` hidden states, ``[N]`` int64 labels, ``weight`` and ``bias`` as ``F.linear`` sees
    them under autocast, the resolved backend and the rows per chunk, after checking every argument."""
    hidden, weight, bias = check_head(name, hidden, weight, bias)
    _check_labels(labels, hidden.shape[:-1], weight.shape[0], hidden.device, ignore_index, validate)
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    resolved = resolve_backend(backend, hidden.device)
    return h, y, weight, bias, resolved, resolve_chunk_rows(chunk_rows, hidden.device, weight.shape[0])


def _fused_linear_loss(
    loss: str,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    reduction: str,
    backend: str,
    chunk_rows: int | None,
    validate: bool,
) -> Tensor:
    _check_reduction(reduction)
    h, y, weight, bias, resolved, chunk_rows = _checked_inputs(
        f"fused_linear_{loss}_loss", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )
    # Per-token losses get their gradients in the backward, where the tokens' weights are known.
    needs = [False] * 3 if reduction == "none" else input_needs(h, weight, bias)
    value = fused_linear_row_loss(
        h, weight, bias, y, loss, ignore_index, reduction, resolved, chunk_rows, needs
    )[0]
    return value.view(labels.shape) if reduction == "none" else value


def fused_linear_ihl_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> Tensor:
    """IHL of the logits ``hidden @ weight.T (+ bias)`` without materialising them.

    ``hidden``: ``[..., H]`` last hidden states aligned with ``labels`` (shift the labels, not the
    hidden states, which would copy them); ``weight``: ``[V, H]`` head, no ``∂W`` when frozen.
    ``reduction="none"`` recomputes the logits in the backward. ``chunk_rows``: tokens per chunk (by
    default about 64M logits on a GPU, 8M on CPU). Other arguments and the result as
    :func:`fastunlearn.ihl_loss`.
    """
    return _fused_linear_loss(
        "ihl", hidden, weight, labels, bias, ignore_index, reduction, backend, chunk_rows, validate
    )


def fused_linear_nll_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> Tensor:
    """Token NLL (cross-entropy) of the logits ``hidden @ weight.T (+ bias)`` without materialising them:
    :func:`fastunlearn.nll_loss` on the chunks. Arguments as in :func:`fused_linear_ihl_loss`."""
    return _fused_linear_loss(
        "nll", hidden, weight, labels, bias, ignore_index, reduction, backend, chunk_rows, validate
    )


def fused_linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
    chunk_rows: int | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per token ``−log p(y)`` and whether ``argmax_v z_v = y`` (first index, as ``torch.argmax``) for the
    logits ``z = hidden @ weight.T (+ bias)``, a chunk at a time and without gradients. Arguments as in
    :func:`fused_linear_nll_loss`. Returns ``(nll, hit)`` shaped like ``labels``, 0/False where ignored.
    """
    h, y, weight, bias, resolved, chunk_rows = _checked_inputs(
        "fused_linear_token_stats", hidden, weight, labels, bias, ignore_index, backend, chunk_rows, validate
    )

    def stats(r0: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        chunk_labels = y[r0 : r0 + logits.shape[0]]
        nll = row_loss(logits.unsqueeze(0), chunk_labels, "nll", ignore_index, resolved, False)[0]
        return nll, logits.argmax(dim=-1) == chunk_labels

    nll, hit = map_chunks(h, weight, bias, chunk_rows, stats)
    return nll.view(labels.shape), hit.view(labels.shape)
