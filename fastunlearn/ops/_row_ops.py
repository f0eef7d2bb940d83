"""The row losses (IHL and NLL) as PyTorch custom operators, whichever backend computes them:
``fastunlearn::row_loss`` (what ``fastunlearn.kernels.ihl.ihl_forward`` returns, differentiable in the
``[B, T, V]`` logits), its backward ``row_loss_backward`` (a new tensor) or ``row_loss_backward_`` (over
the logits). ``backend`` is already resolved; the fake implementations give shapes and dtypes."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastunlearn.ops import _ihl_torch
from fastunlearn.ops._backend import implementation, result_dtype


def row_implementation(backend: str) -> ModuleType:
    return implementation(backend, "ihl", _ihl_torch)


def index_dtype(backend: str) -> torch.dtype:
    return torch.int32 if backend == "triton" else torch.int64


@torch.library.custom_op("fastunlearn::row_loss", mutates_args=())
def row_loss(
    logits: Tensor, labels: Tensor, loss: str, ignore_index: int, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return row_implementation(backend).ihl_forward(logits, labels, ignore_index, loss=loss)


@row_loss.register_fake
def _(logits, labels, loss, ignore_index, backend, inplace_backward):
    n, dtype = labels.shape[0], result_dtype(logits, backend)
    stats = logits.new_empty(n, 4, dtype=dtype)
    return logits.new_empty(n, dtype=dtype), stats, logits.new_empty(n, dtype=index_dtype(backend))


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
    return row_implementation(backend).ihl_backward(
        logits, labels, stats, argmax, grad_rows, grad, ignore_index
    )


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
    row_implementation(backend).ihl_backward(logits, labels, stats, argmax, grad_rows, logits, ignore_index)


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
    if not inplace_backward:
        grad = row_loss_backward(logits, labels, stats, argmax, grad_loss, ignore_index, backend)
        return grad, None, None, None, None, None
    row_loss_backward_(logits, labels, stats, argmax, grad_loss, ignore_index, backend)
    return logits, None, None, None, None, None


row_loss.register_autograd(_backward, setup_context=_setup_context)
