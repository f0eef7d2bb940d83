"""The fused-linear IHL and NLL as PyTorch custom operators, whichever backend runs the row kernels.

- ``fastunlearn::fused_linear_row_loss(hidden [N, H], weight [V, H], bias, labels [N], loss,
  ignore_index, reduction, backend, chunk_rows, needs) -> (value, stats, argmax, ∂h, ∂W, ∂b,
  workspace)``: the loss of the logits ``hidden @ weight.T (+ bias)`` a chunk of rows at a time.
  ``value`` is the reduced loss, or ``[N]`` per-row losses for ``reduction="none"``; for ``"mean"``
  and ``"sum"`` the input gradients named by ``needs`` (``∂h``, ``∂W``, ``∂b``) are formed during the
  forward (their scale is known then) and returned, empty where not needed; for ``"none"`` the row
  statistics ``stats``, ``argmax`` are what the backward needs. Differentiable in ``hidden``,
  ``weight`` and ``bias``.
- ``fastunlearn::fused_linear_row_loss_backward(grad_rows, hidden, weight, bias, labels, stats,
  argmax, ...) -> (∂h, ∂W, ∂b, workspace)``: the backward of ``reduction="none"``, recomputing each
  chunk's logits.

Workspace contract: both operators hold their scratch memory in one buffer (the chunk's logits
``[min(chunk_rows, N), V]`` in the inputs' dtype, over which the row kernels write the chunk's
gradient, and :func:`~fastunlearn.ops._linear_chunks.head_layout`'s ``∂W`` product and ``∂b`` row sum)
and return a zero-element view of it as ``workspace``, which keeps that buffer alive until the caller
drops it (:mod:`fastunlearn.ops._workspace`). The fake implementations build the same buffer and the
same outputs without computing, so a live-bytes tracker under ``FakeTensorMode`` sees the peak the
real operator reaches (less the PyTorch path's few-MiB row blocks, see :mod:`._row_ops`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastunlearn.ops._ihl_torch import valid_targets
from fastunlearn.ops._linear_chunks import HeadGrads, chunk_logits, head_layout
from fastunlearn.ops._row_ops import implementation, index_dtype, stats_dtype
from fastunlearn.ops._workspace import Layout, Workspace

__all__ = ["fused_linear_row_loss", "fused_linear_row_loss_backward"]


def _layout(hidden: Tensor, weight: Tensor, chunk_rows: int, needs: tuple[bool, ...]) -> Layout:
    rows = min(chunk_rows, hidden.shape[0])
    return {"logits": ((rows, weight.shape[0]), hidden.dtype), **head_layout(weight, needs)}


def _scale_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


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
    impl = implementation(backend)
    with torch.autocast(hidden.device.type, enabled=False):
        # 1/count of the mean, in the losses' dtype; a device tensor, no host synchronisation.
        count = valid_targets(labels, weight.shape[0], ignore_index).sum().clamp_min(1)
        count = count.to(_scale_dtype(hidden))
        scale = count.reciprocal() if reduction == "mean" else torch.ones_like(count)
        wanted = _forward_grads(reduction, needs)
        workspace = Workspace(_layout(hidden, weight, chunk_rows, wanted), hidden.device)
        grads = HeadGrads(wanted, hidden, weight, bias, workspace)
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
    n, dtype = hidden.shape[0], stats_dtype(hidden, backend)
    wanted = _forward_grads(reduction, needs)
    workspace = Workspace(_layout(hidden, weight, chunk_rows, wanted), hidden.device)
    grads = HeadGrads(wanted, hidden, weight, bias, workspace)
    if reduction == "none":
        value = hidden.new_empty(n, dtype=dtype)
    else:
        value = hidden.new_empty((), dtype=torch.promote_types(dtype, _scale_dtype(hidden)))
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
    impl = implementation(backend)
    grad_rows = grad_rows.to(stats.dtype)
    wanted = (needs[0], needs[1], needs[2])
    with torch.autocast(hidden.device.type, enabled=False):
        workspace = Workspace(_layout(hidden, weight, chunk_rows, wanted), hidden.device)
        grads = HeadGrads(wanted, hidden, weight, bias, workspace)
        for r0, h_chunk, logits in chunk_logits(hidden, weight, bias, chunk_rows, workspace["logits"]):
            r1, rows = r0 + h_chunk.shape[0], logits.unsqueeze(0)
            impl.ihl_backward(
                rows, labels[r0:r1], stats[r0:r1], argmax[r0:r1], grad_rows[r0:r1], rows, ignore_index
            )
            grads.fold(r0, h_chunk, logits)
    return *grads.outputs(hidden), workspace.handle()


@fused_linear_row_loss_backward.register_fake
def _(grad_rows, hidden, weight, bias, labels, stats, argmax, ignore_index, backend, chunk_rows, needs):
    wanted = (needs[0], needs[1], needs[2])
    workspace = Workspace(_layout(hidden, weight, chunk_rows, wanted), hidden.device)
    return *HeadGrads(wanted, hidden, weight, bias, workspace).outputs(hidden), workspace.handle()


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
    needs = list(ctx.needs_input_grad[:3])
    if per_token:
        saved = ctx.saved_tensors
        grads = fused_linear_row_loss_backward(grad_value, *saved, ignore_index, backend, chunk_rows, needs)
    else:  # formed in the forward: only grad_output's scale is missing
        grads = [g * grad_value.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, needs)]
    dh, dw, db = (g if need else None for g, need in zip(grads, needs))
    dw = dw.to(weight_dtype) if dw is not None else None
    db = db.to(weight_dtype) if db is not None else None
    return dh, dw, db, None, None, None, None, None, None, None


fused_linear_row_loss.register_autograd(_backward, setup_context=_setup_context)
