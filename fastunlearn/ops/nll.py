"""The shifted next-token negative log-likelihood of a causal LM, the one definition in fastunlearn.

``nll[b, t] = −log softmax(logits[b, t])[labels[b, t + 1]]`` (Hugging Face's labels; 0 where ignored).
The *labels* are shifted, never the logits: a ``logits[:, :-1]`` slice would make autograd scatter its
gradient into a fresh ``[B, T, V]`` buffer. Computed by :func:`fastunlearn.nll_loss` (fp32 statistics).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops._backend import Backend
from fastunlearn.ops.ihl import check_label_range, nll_loss


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``targets[:, t] = labels[:, t + 1]``, and ``ignore_index`` at the last position (``[B, T]``)."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def labelled_rows(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Flat indices of the positions of ``targets`` (any shape) that carry a label, in order: the rows
    of ``hidden.reshape(-1, H)`` a loss or metric reads. On the targets' device; call it on CPU labels
    (a data loader's) to know them without synchronising an accelerator, then move the indices."""
    return (targets.reshape(-1) != ignore_index).nonzero().squeeze(1)


def shifted_nll(
    logits: Tensor,
    labels: Tensor,
    reduction: Literal["mean", "sum", "none"] = "mean",
    *,
    validate: bool = True,
) -> Tensor:
    """Next-token NLL of ``logits`` ``[B, T, V]`` against ``labels`` ``[B, T]`` (module docstring), fp32
    on the logits' device (fp64 for fp64 logits); ``"none"`` gives a flat ``[B·T]`` tensor, 0 in the
    last column and at ignored targets. CPU labels are range-checked on the host, with no device sync.
    """
    targets = shift_labels(labels)
    if validate and targets.device != logits.device and targets.device.type == "cpu":
        check_label_range(targets, logits.shape[-1], IGNORE_INDEX)
        validate = False  # checked here, on the host
    targets = targets.to(logits.device)
    # The Triton kernels compute in fp32; only the PyTorch path keeps fp64 logits in fp64.
    backend = "torch" if logits.dtype == torch.float64 else "auto"
    loss = nll_loss(logits, targets, reduction=reduction, backend=backend, validate=validate)
    return loss.flatten() if reduction == "none" else loss


def sequence_logprobs(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    backend: Backend = "auto",
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-sequence log-probability of the targets, ``S(x) = Σ_t log p(y_{t+1} | y_≤t)``, and their count
    ``n(x)``: what NPO (Zhang et al. 2024), SimNPO (Fan et al. 2024) and DPO (Rafailov et al. 2023)
    compare. ``logits`` ``[B, T, V]``, ``labels`` ``[B, T]`` as ``transformers`` takes them (shifted
    here). Returns ``(logp_sum [B], n_tokens [B])``: fp32 sums (fp64 for fp64 logits on the PyTorch
    path), differentiable in ``logits``, int64 counts.
    """
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("sequence_logprobs expects tensors for `logits` and `labels`")
    if logits.dim() != 3 or labels.dim() != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"sequence_logprobs needs logits [B, T, V] and labels [B, T]: got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    targets = shift_labels(labels, ignore_index)
    nll = nll_loss(
        logits, targets, ignore_index=ignore_index, reduction="none", backend=backend, validate=validate
    )
    return -nll.sum(-1), (targets != ignore_index).sum(-1)
