"""The fused-linear IHL and NLL as PyTorch custom operators, whichever backend runs the row kernels.

``fastunlearn::fused_linear_row_loss`` computes the loss of ``hidden @ weight.T (+ bias)`` a chunk of
rows at a time, returning ``(value, stats, argmax, ∂h, ∂W, ∂b, workspace)``: for ``"mean"``/``"sum"``
the gradients named by ``needs`` are formed in the forward; for ``"none"`` the row statistics let
``fused_linear_row_loss_backward`` recompute each chunk. Scratch memory is one workspace
(:mod:`fastunlearn.ops._workspace`), built alike by the fake implementations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops._backend import compute_dtype, result_dtype
from fastunlearn.ops._ihl_torch import valid_targets
from fastunlearn.ops._linear_chunks import chunk_logits, chunk_scratch, input_grads
from fastunlearn.ops._row_ops import index_dtype, row_implementation


def _forward_grads(reduction: str, needs: list[bool]) -> tuple[bool, bool, bool]:
    """The gradients the forward forms: those asked for, except for per-row losses."""
    return (False, False, False) if reduction == "none" else (needs[0], needs[1], needs[2])


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
    impl = row_implementation(backend)
    with torch.autocast(hidden.device.type, enabled=False):
        # 1/count of the mean, in the losses' dtype; a device tensor, no host synchronisation.
        count = valid_targets(labels, weight.shape[0], ignore_index).sum().clamp_min(1)
        count = count.to(compute_dtype(hidden))
        scale = count.reciprocal() if reduction == "mean" else torch.ones_like(count)
        workspace, grads = chunk_scratch(hidden, weight, bias, chunk_rows, _forward_grads(reduction, needs))
        outs = []
        for r0, h_chunk, logits in chunk_logits(hidden, weight, bias, chunk_rows, workspace["logits"]):
            rows, y = logits.unsqueeze(0), labels[r0 : r0 + h_chunk.shape[0]]
            out = impl.ihl_forward(rows, y, ignore_index, loss=loss)
            outs.append(out)
            if grads.any:
                impl.ihl_backward(rows, y, out[1], out[2], scale, rows, ignore_index)  # in place
                grads.fold(r0, h_chunk, logits)
        losses, stats, argmax = (torch.cat(parts) for parts in zip(*outs))
    value = losses if reduction == "none" else losses.sum() * scale
    return value, stats, argmax, *grads.outputs(hidden), workspace.handle()


@fused_linear_row_loss.register_fake
def _(hidden, weight, bias, labels, loss, ignore_index, reduction, backend, chunk_rows, needs):
    n, dtype = hidden.shape[0], result_dtype(hidden, backend)
    workspace, grads = chunk_scratch(hidden, weight, bias, chunk_rows, _forward_grads(reduction, needs))
    if reduction == "none":
        value = hidden.new_empty(n, dtype=dtype)
    else:
        value = hidden.new_empty((), dtype=torch.promote_types(dtype, compute_dtype(hidden)))
    stats = hidden.new_empty(n, 4, dtype=dtype)
    argmax = hidden.new_empty(n, dtype=index_dtype(backend))
    return value, stats, argmax, *grads.outputs(hidden), workspace.handle()


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
    impl = row_implementation(backend)
    grad_rows = grad_rows.to(stats.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        workspace, grads = chunk_scratch(hidden, weight, bias, chunk_rows, tuple(needs))
        for r0, h_chunk, logits in chunk_logits(hidden, weight, bias, chunk_rows, workspace["logits"]):
            r1, rows = r0 + h_chunk.shape[0], logits.unsqueeze(0)
            impl.ihl_backward(
                rows, labels[r0:r1], stats[r0:r1], argmax[r0:r1], grad_rows[r0:r1], rows, ignore_index
            )
            grads.fold(r0, h_chunk, logits)
    return *grads.outputs(hidden), workspace.handle()


@fused_linear_row_loss_backward.register_fake
def _(grad_rows, hidden, weight, bias, labels, stats, argmax, ignore_index, backend, chunk_rows, needs):
    workspace, grads = chunk_scratch(hidden, weight, bias, chunk_rows, tuple(needs))
    return *grads.outputs(hidden), workspace.handle()


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, _, ignore_index, reduction, backend, chunk_rows, _ = inputs
    _, stats, argmax, grad_h, grad_w, grad_b, workspace = output
    ctx.mark_non_differentiable(stats, argmax, grad_h, grad_w, grad_b, workspace)
    ctx.options = (reduction == "none", ignore_index, backend, chunk_rows, weight.dtype)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels, stats, argmax)
    else:
        ctx.save_for_backward(grad_h, grad_w, grad_b)


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
