"""The Inverted Hinge Loss of Cha et al. 2025 (arXiv 2408.06621, §3.1) and the token NLL on the same
kernels.

For each target token, with ``p = softmax(z)``, IHL is ``ℓ = 1 + p_y − max_{v≠y} p_v ∈ [0, 2]``:
minimising it pushes the true token below its best alternative, so the mass goes to a plausible
replacement instead of collapsing the model (gradient ascent's failure). :func:`nll_loss` is
``−log p_y`` on the same kernels in NLL mode. Both read the logits once forward and once backward, with
fp32 statistics and no ``[N, V]`` log-softmax, through the custom operator ``fastunlearn::row_loss``
(Triton on CUDA, a chunked PyTorch path with the same numerics on CPU), whose backward writes a new
tensor (``row_loss_backward``) or over the logits (``row_loss_backward_``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fastunlearn.ops._backend import Backend, resolve_backend, result_dtype
from fastunlearn.ops._ihl_torch import implementation, valid_targets

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")


def fake_rows(like: Tensor, n: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Empty ``(loss, stats, argmax)`` of ``n`` rows, as ``ihl_forward`` gives them for ``backend``."""
    dtype, index = result_dtype(like, backend), torch.int32 if backend == "triton" else torch.int64
    return like.new_empty(n, dtype=dtype), like.new_empty(n, 4, dtype=dtype), like.new_empty(n, dtype=index)


@torch.library.custom_op("fastunlearn::row_loss", mutates_args=())
def row_loss(
    logits: Tensor, labels: Tensor, loss: str, ignore_index: int, backend: str, inplace_backward: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "ihl").ihl_forward(logits, labels, ignore_index, loss=loss)


@row_loss.register_fake
def _(logits, labels, loss, ignore_index, backend, inplace_backward):
    return fake_rows(logits, labels.shape[0], backend)


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
    return implementation(backend, "ihl").ihl_backward(
        logits, labels, stats, argmax, grad_rows, logits.new_empty(logits.shape), ignore_index
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
    implementation(backend, "ihl").ihl_backward(
        logits, labels, stats, argmax, grad_rows, logits, ignore_index
    )


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, _, ignore_index, backend, inplace_backward = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(logits, labels, *output[1:])  # with the row statistics and arg-maxima
    ctx.options = (ignore_index, backend, inplace_backward)


def _backward(ctx, grad_loss: Tensor, _grad_stats, _grad_argmax):
    ignore_index, backend, inplace_backward = ctx.options
    args = (*ctx.saved_tensors, grad_loss, ignore_index, backend)
    if inplace_backward:
        row_loss_backward_(*args)  # its fake PyTorch generates: it returns nothing
        return args[0], None, None, None, None, None
    return row_loss_backward(*args), None, None, None, None, None


row_loss.register_autograd(_backward, setup_context=_setup_context)


def _as_rows(logits: Tensor) -> Tensor:
    """``[..., V]`` logits as ``[B, T, V]``: a flat ``[1, N, V]`` view where one exists, else a view
    through both leading strides (as of a slice ``logits[:, :-1]``), a copy only when neither exists."""
    V = logits.shape[-1]
    if logits.dim() < 3:
        return logits.view(1, -1, V) if logits.dim() == 1 else logits.unsqueeze(0)
    rows = logits.flatten(0, -3)  # a copy only when the dimensions before T cannot be merged
    B, T = rows.shape[:2]
    if B == 1 or T == 1 or rows.stride(0) == T * rows.stride(1):
        return rows.view(1, -1, V)
    return rows


def _check_labels(
    labels: Tensor,
    batch_shape: torch.Size,
    vocab: int,
    device: torch.device,
    ignore_index: int,
    validate: bool,
) -> None:
    """Errors for labels that do not fit logits of shape ``[*batch_shape, vocab]`` on ``device``."""
    if not isinstance(labels, Tensor):
        raise TypeError("labels must be a tensor of token ids")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids), got {labels.dtype}")
    if tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(
            f"labels must have the shape of logits without its last (vocabulary) dimension: logits "
            f"{(*batch_shape, vocab)} needs labels {tuple(batch_shape)}, got {tuple(labels.shape)}"
        )
    if vocab < 2:
        raise ValueError(f"IHL needs a vocabulary of at least 2 entries, got {vocab}")
    if labels.device != device:
        raise ValueError(f"logits are on {device} but labels are on {labels.device}")
    if validate:
        check_label_range(labels, vocab, ignore_index)


def check_label_range(labels: Tensor, vocab: int, ignore_index: int = -100) -> None:
    """``ValueError`` for a label outside ``[0, vocab)`` that is not ``ignore_index``: one host
    synchronisation for labels on an accelerator, a graph break under ``torch.compile``. Fake and meta
    tensors (a memory plan's) are not checked."""
    from torch._subclasses.fake_tensor import is_fake

    if labels.device.type == "meta" or is_fake(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        first = labels[bad][0].item()
        raise ValueError(
            f"label {first} is outside the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def ihl_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
) -> Tensor:
    """Inverted Hinge Loss ``1 + p_y − max_{v≠y} p_v`` of each target token (Cha et al. 2025).

    ``logits``: ``[..., V]``, any float dtype and strides, aligned with the integer ``labels`` as in
    ``F.cross_entropy`` (shift the labels for causal LMs); ``ignore_index`` carries no loss.
    ``reduction``: ``"mean"`` over non-ignored tokens (0 when none), ``"sum"`` or ``"none"`` (shape of
    ``labels``). ``backend``: ``"auto"`` (Triton for CUDA tensors, else PyTorch), ``"triton"`` (also CPU
    under ``TRITON_INTERPRET=1``) or ``"torch"``. ``inplace_backward``: the gradient overwrites the
    logits. ``validate``: check labels lie in ``[0, V)`` (one host sync); else out-of-range labels are
    ignored. The loss is fp32 (fp64 for fp64 logits on the PyTorch path); the gradient the logits' dtype.
    """
    return _row_loss("ihl", logits, labels, ignore_index, reduction, backend, inplace_backward, validate)


def nll_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
) -> Tensor:
    """Negative log-likelihood ``−log p_y`` of each target token, ``F.cross_entropy``'s value without its
    ``[N, V]`` log-softmax or an fp32 copy of bf16 logits, accurate on confident rows. Arguments and
    results as in :func:`ihl_loss`."""
    return _row_loss("nll", logits, labels, ignore_index, reduction, backend, inplace_backward, validate)


def _row_loss(
    loss: str,
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    reduction: str,
    backend: str,
    inplace_backward: bool,
    validate: bool,
) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{loss}_loss expects a tensor of logits")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (fp32, bf16 or fp16), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    _check_reduction(reduction)
    _check_labels(labels, logits.shape[:-1], logits.shape[-1], logits.device, ignore_index, validate)
    resolved = resolve_backend(backend, logits.device)
    flat_labels = labels.reshape(-1).long()
    rows, _, _ = row_loss(_as_rows(logits), flat_labels, loss, ignore_index, resolved, inplace_backward)
    if reduction == "none":
        return rows.view(labels.shape)
    if reduction == "sum":
        return rows.sum()
    count = valid_targets(flat_labels, logits.shape[-1], ignore_index).sum()
    return rows.sum() / count.clamp_min(1)


class IHLLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`ihl_loss`; ``forward(logits, labels)``."""

    def __init__(
        self, ignore_index: int = -100, reduction: Reduction = "mean", backend: Backend = "auto"
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return ihl_loss(
            logits, labels, ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}"
