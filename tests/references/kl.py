"""``KL(P_ref ‖ P_θ)`` per row and its gradient in fp64, from log-softmaxes written plainly.

With ``p = softmax(z)`` (the trained model's logits) and ``q = softmax(r)`` (the reference's),
``KL = Σ_v q_v (log q_v − log p_v)`` (``0·log 0 = 0``) and ``∂KL/∂z = p − q``. The loss of a batch is a
weighted sum of the rows: ``1/N`` each (``F.kl_div(..., reduction="batchmean")`` on the flattened rows)
or ``mask/Σ mask``.
"""

from __future__ import annotations

import torch


def kl_oracle_rows(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl [N], grad [N, V])`` of ``[N, V]`` logits, in fp64."""
    log_p = logits.detach().double().log_softmax(-1)
    log_q = ref_logits.detach().double().log_softmax(-1)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
    return kl, log_p.exp() - q


def row_weights(mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """The fp64 weights of the mean over rows: ``1/N``, or ``mask/Σ mask`` (all 0 if nothing is kept)."""
    if mask is None:
        return torch.full((n,), 1 / max(n, 1), dtype=torch.float64)
    keep = (mask.reshape(-1) != 0).double()
    return keep / keep.sum().clamp_min(1)


def kl_oracle(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None, grad_out: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the logits' gradient for the upstream gradient ``grad_out``, in fp64."""
    vocab = logits.shape[-1]
    kl, grad = kl_oracle_rows(logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab))
    weights = row_weights(mask, kl.shape[0])
    return (kl * weights).sum(), (grad * (weights * grad_out)[:, None]).view(logits.shape)
