"""The Inverted Hinge Loss (and the NLL on the same kernels): user-facing functions, module and
autograd wrapper.

IHL (Cha et al., ICLR 2025, §3.1) replaces gradient ascent on the forget set. For each target token,
with ``p = softmax(z)`` and ``m`` the most likely *other* token,

    ℓ = 1 + p_y − max_{v≠y} p_v ∈ [0, 2],

so minimising it pushes the true token below its best alternative and the probability mass goes to a
plausible replacement instead of collapsing the model. The loss of a batch is the mean of ℓ over its
non-ignored target tokens.

Backends (see :func:`ihl_loss`): the Triton kernels of ``fastunlearn.kernels.ihl`` on CUDA and a chunked
PyTorch path with identical numerics on CPU, both behind the custom operators of
:mod:`fastunlearn.ops._row_ops`: ``torch.compile`` traces these functions to one opaque node (the
label check of ``validate=True`` is a graph break) and ``FakeTensorMode`` runs them on shapes alone.

:func:`nll_loss` is the token negative log-likelihood ``−log p_y`` (cross-entropy) on the same
kernels in their NLL mode: one read of the logits forward, one read and one write backward, fp32
statistics for bf16 logits and no ``[N, V]`` log-softmax — the retain term of the paper's objective.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fastunlearn.ops._backend import Backend, resolve_backend
from fastunlearn.ops._ihl_torch import valid_targets
from fastunlearn.ops._row_ops import row_loss

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS = ("mean", "sum", "none")

__all__ = ["IHLLoss", "ihl_loss", "nll_loss"]


def _as_rows(logits: Tensor) -> Tensor:
    """``[..., V]`` logits as ``[B, T, V]``: a flat ``[1, N, V]`` view where one exists, else a
    ``[B, T, V]`` view through both leading strides (a causal-shift slice such as ``logits[:, :-1]``
    has no flat view; the kernels address rows through both), a copy only when neither exists."""
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
    """``ValueError`` for a label outside ``[0, vocab)`` that is not ``ignore_index``. Reads the answer on
    the host: one synchronisation when ``labels`` live on an accelerator, none on the CPU. Labels without
    values (fake or meta tensors, as in a memory plan) are not checked. Under ``torch.compile`` the
    check is a graph break (``validate=False`` avoids it)."""
    if has_no_values(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        first = labels[bad][0].item()
        raise ValueError(
            f"label {first} is outside the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})"
        )


def has_no_values(tensor: Tensor) -> bool:
    """Whether ``tensor`` carries shapes only (a ``FakeTensor`` or a meta tensor): nothing to read."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type == "meta" or is_fake(tensor)


def _check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {allowed}")


def _check_inputs(
    name: str, logits: Tensor, labels: Tensor, ignore_index: int, reduction: str, validate: bool
) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} expects a tensor of logits")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (fp32, bf16 or fp16), got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    _check_reduction(reduction)
    _check_labels(labels, logits.shape[:-1], logits.shape[-1], logits.device, ignore_index, validate)


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

    Args:
        logits: ``[..., V]`` scores, fp32, bf16 or fp16, any strides. Targets are aligned as in
            ``F.cross_entropy``: the caller shifts them for causal language modelling.
        labels: integer token ids of shape ``logits.shape[:-1]``; ``ignore_index`` marks positions
            that carry no loss (prompt tokens, padding).
        reduction: ``"mean"`` over non-ignored tokens of the whole batch (the paper's), ``"sum"``, or
            ``"none"`` (per token, shape of ``labels``, 0 at ignored positions). A batch without a
            valid token gives 0 and a zero gradient.
        backend: ``"auto"`` (Triton for CUDA tensors, the chunked PyTorch path otherwise),
            ``"triton"`` (also CPU tensors under ``TRITON_INTERPRET=1``) or ``"torch"``.
        inplace_backward: write the gradient over the logits' storage (no extra memory). The logits
            are destroyed by the backward: nothing else may read them afterwards.
        validate: check that labels lie in ``[0, V)`` (one host synchronisation). With
            ``validate=False`` out-of-range labels are treated as ignored.

    Returns:
        The loss in fp32 (fp64 for fp64 logits on the PyTorch paths); its gradient has the logits'
        dtype. Fused paths accumulate in fp32 and keep ``1 − p_y`` as a sum, never a subtraction.
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
    """Negative log-likelihood ``−log p_y = lse(z) − z_y`` of each target token, the value
    of ``F.cross_entropy`` without its ``[N, V]`` log-softmax or an fp32 copy of bf16 logits.

    Arguments, reductions, backends and return dtypes as in :func:`ihl_loss`. The loss is formed as
    ``softplus(log S_{≠y} − z_y)`` and its target gradient as ``−S_{≠y}/S`` (``S_{≠y}`` the sum of
    the other exponentials), so confident rows keep their relative accuracy (see
    ``fastunlearn.kernels.ihl``).
    """
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
    _check_inputs(f"{loss}_loss", logits, labels, ignore_index, reduction, validate)
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
