"""The shifted next-token negative log-likelihood of a causal LM: the one definition in fastunlearn.

Labels follow the Hugging Face convention: ``labels[:, t]`` is the token at position ``t`` (or
``IGNORE_INDEX`` where no loss is taken), and the logit at ``t`` predicts the token at ``t + 1``. So

    nll[b, t] = −log softmax(logits[b, t])[labels[b, t + 1]]     (0 where that label is ignored)

The *labels* are shifted (left by one, the last position getting ``IGNORE_INDEX``), never the logits:
``[B, T, V]`` logits then flatten to ``[B·T, V]`` as a view instead of being copied by a
``logits[:, :-1]`` slice. The log-softmax runs in fp32 at least (bf16/fp16 logits lose the NLL's
digits) and in fp64 for fp64 logits.

Used by the training objectives (:mod:`fastunlearn.training.methods`), the answer statistics
(:mod:`fastunlearn.evaluation.likelihood`) and the Fisher estimate (:mod:`fastunlearn.fisher.estimator`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fastunlearn.ops import IGNORE_INDEX

__all__ = ["shift_labels", "shifted_nll"]


def shift_labels(labels: Tensor) -> Tensor:
    """``targets[:, t] = labels[:, t + 1]``, and ``IGNORE_INDEX`` at the last position (``[B, T]``)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shifted_nll(logits: Tensor, labels: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Next-token NLL of ``logits`` ``[B, T, V]`` against ``labels`` ``[B, T]`` (module docstring).

    ``reduction``: ``"mean"`` over the non-ignored targets, ``"sum"``, or ``"none"``: a flat ``[B·T]``
    tensor (``.view(labels.shape)`` gives ``[B, T]``; the last column and ignored targets are 0).
    Labels may be on another device than the logits; the result is on the logits' device.
    """
    logits = logits.flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = shift_labels(labels).to(logits.device).flatten()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
