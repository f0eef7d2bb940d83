"""The shifted next-token negative log-likelihood of a causal LM: the one definition in fastunlearn.

Labels follow the Hugging Face convention: ``labels[:, t]`` is the token at position ``t`` (or
``IGNORE_INDEX`` where no loss is taken), and the logit at ``t`` predicts the token at ``t + 1``. So

    nll[b, t] = −log softmax(logits[b, t])[labels[b, t + 1]]     (0 where that label is ignored)

The *labels* are shifted (left by one, the last position getting ``IGNORE_INDEX``), never the logits:
``[B, T, V]`` logits then reach the kernel as they are, instead of as a ``logits[:, :-1]`` slice whose
gradient autograd would scatter into a fresh ``[B, T, V]`` buffer. The NLL is
:func:`fastunlearn.nll_loss` (the row kernels in NLL mode): bf16/fp16 logits are read in their own
dtype and the statistics accumulate in fp32 inside the kernel, so there is no fp32 copy of the
logits (``F.cross_entropy`` would need one to keep the NLL's digits); fp64 logits stay fp64.

Used by the answer statistics (:mod:`fastunlearn.evaluation.likelihood`), the Fisher estimate
(:mod:`fastunlearn.fisher.estimator`) and the demo's pre-training. The training objectives compute the
same quantity inside the model's forward (:mod:`fastunlearn.models.patching`), from the hidden states.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunlearn.ops import IGNORE_INDEX
from fastunlearn.ops.ihl import check_label_range, nll_loss

__all__ = ["labelled_rows", "shift_labels", "shifted_nll"]


def shift_labels(labels: Tensor) -> Tensor:
    """``targets[:, t] = labels[:, t + 1]``, and ``IGNORE_INDEX`` at the last position (``[B, T]``)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


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
    """Next-token NLL of ``logits`` ``[B, T, V]`` against ``labels`` ``[B, T]`` (module docstring).

    ``reduction``: ``"mean"`` over the non-ignored targets, ``"sum"``, or ``"none"``: a flat ``[B·T]``
    tensor (``.view(labels.shape)`` gives ``[B, T]``; the last column and ignored targets are 0).
    Labels may be on another device than the logits; the result is on the logits' device, in fp32
    (fp64 for fp64 logits). ``validate``: a label outside ``[0, V)`` raises ``ValueError``. The check
    runs where the labels are, before they move: labels on the CPU (as a data loader gives them) are
    checked without synchronising the logits' device, so a loop over batches never stalls on it;
    labels already on an accelerator cost one host synchronisation per call. ``False`` skips the
    check and counts such labels as ignored.
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
