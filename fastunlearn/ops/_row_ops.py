"""The row losses (IHL and NLL) as PyTorch custom operators, whichever backend computes them.

- ``fastunlearn::row_loss(logits, labels, loss, ignore_index, backend, inplace_backward)``: the
  per-row loss of ``[B, T, V]`` logits (any strides) against flat int64 labels ``[B·T]``, and what the
  backward needs: ``(loss [N], stats [N, 4], argmax [N])`` as ``fastunlearn.kernels.ihl.ihl_forward``
  returns them. Differentiable in ``logits``.
- ``fastunlearn::row_loss_backward(...)``: ``grad_rows[r]·∂ℓ_r/∂logits[r]`` into a new tensor, and
  ``fastunlearn::row_loss_backward_(...)``: the same written over the logits (``inplace_backward``).

``backend`` (``"triton"`` or ``"torch"``, already resolved) picks the Triton kernels or the chunked
PyTorch path (:mod:`fastunlearn.ops._ihl_torch`) inside the operator, so ``torch.compile`` traces one
opaque node and ``FakeTensorMode`` runs the fake implementations, which give every output's shape
and dtype without computing. Neither backend allocates scratch memory beyond its outputs, except the
PyTorch path's row blocks (``_ihl_torch.CPU_BLOCK_ELEMENTS``: a few MiB on CPU), which the fake
implementations do not report.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastunlearn.ops import _ihl_torch

__all__ = ["implementation", "row_loss", "row_loss_backward", "row_loss_backward_"]


def implementation(backend: str) -> ModuleType:
    """The module computing the row losses for a resolved backend (same functions in both)."""
    if backend == "triton":
        from fastunlearn.kernels import ihl as triton_ihl  # imports triton: only when asked for

        return triton_ihl
    return _ihl_torch


def stats_dtype(logits: Tensor, backend: str) -> torch.dtype:
    """The dtype of the per-row losses and statistics: fp32, or fp64 for fp64 logits on PyTorch."""
    return torch.float64 if backend == "torch" and logits.dtype == torch.float64 else torch.float32


def index_dtype(backend: str) -> torch.dtype:
    return torch.int32 if backend == "triton" else torch.int64


@torch.library.custom_op("fastunlearn::row_loss", mutates_args=())
def row_loss(
    logits: Tensor, labels: Tensor, loss: str, ignore_index: int, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend).ihl_forward(logits, labels, ignore_index, loss=loss)


@row_loss.register_fake
def _(logits, labels, loss, ignore_index, backend, inplace_backward):
    n, dtype = labels.shape[0], stats_dtype(logits, backend)
    return (
        logits.new_empty(n, dtype=dtype),
        logits.new_empty(n, 4, dtype=dtype),
        logits.new_empty(n, dtype=index_dtype(backend)),
    )


@torch.library.custom_op("fastunlearn::row_loss_backward", mutates_args=())
def row_loss_backward(
    logits: Tensor,
    labels: Tensor,
    stats: Tensor,
    argmax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    backend: str,
) -> Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return implementation(backend).ihl_backward(logits, labels, stats, argmax, grad_rows, grad, ignore_index)


@row_loss_backward.register_fake
def _(logits, labels, stats, argmax, grad_rows, ignore_index, backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("fastunlearn::row_loss_backward_", mutates_args=("logits",))
def row_loss_backward_(
    logits: Tensor,
    labels: Tensor,
    stats: Tensor,
    argmax: Tensor,
    grad_rows: Tensor,
    ignore_index: int,
    backend: str,
) -> None:
    implementation(backend).ihl_backward(logits, labels, stats, argmax, grad_rows, logits, ignore_index)


@row_loss_backward_.register_fake
def _(logits, labels, stats, argmax, grad_rows, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, _, ignore_index, backend, inplace_backward = inputs
    _, stats, argmax = output
    ctx.mark_non_differentiable(stats, argmax)
    ctx.save_for_backward(logits, labels, stats, argmax)
    ctx.options = (ignore_index, backend, inplace_backward)


def _backward(ctx, grad_loss: Tensor, _grad_stats, _grad_argmax):
    logits, labels, stats, argmax = ctx.saved_tensors
    ignore_index, backend, inplace_backward = ctx.options
    if inplace_backward:
        row_loss_backward_(logits, labels, stats, argmax, grad_loss, ignore_index, backend)
        grad = logits
    else:
        grad = row_loss_backward(logits, labels, stats, argmax, grad_loss, ignore_index, backend)
    return grad, None, None, None, None, None


row_loss.register_autograd(_backward, setup_context=_setup_context)
