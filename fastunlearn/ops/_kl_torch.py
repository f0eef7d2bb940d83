"""The PyTorch (CPU) path of ``fastunlearn.kernels.kl``: the same formulas a cache-sized block of rows at
a time; fp64 logits are kept in fp64."""

from __future__ import annotations

import torch

from fastunlearn.ops._backend import compute_dtype
from fastunlearn.ops._ihl_torch import row_ranges


def _shift(maximum: torch.Tensor) -> torch.Tensor:
    """The row maximum, or 0 for a row of ``-inf`` (which would give ``exp(-inf − -inf) = nan``)."""
    return torch.where(maximum == float("-inf"), 0.0, maximum)


def kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastunlearn.kernels.kl.kl_forward``."""
    n, vocab = logits.shape
    acc = compute_dtype(logits)
    kl = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, 2, dtype=acc, device=logits.device)
    for r0, r1 in row_ranges(n, vocab, logits.device):
        z, r = logits[r0:r1].to(acc), ref_logits[r0:r1].to(acc)
        shift_z = _shift(z.amax(dim=1, keepdim=True))
        shift_r = _shift(r.amax(dim=1, keepdim=True))
        sum_z = (z - shift_z).exp_().sum(dim=1, keepdim=True)
        e_r = (r - shift_r).exp_()
        sum_r = e_r.sum(dim=1, keepdim=True)
        cross = torch.where(e_r > 0, e_r * (r - z), 0.0).sum(dim=1, keepdim=True)
        kl[r0:r1] = (cross / sum_r + (shift_z - shift_r) + torch.log(sum_z / sum_r)).squeeze(1)
        torch.cat([shift_z + sum_z.log(), shift_r + sum_r.log()], dim=1, out=lse[r0:r1])
    if weights is not None:  # skipped rows: zeros, whatever their logits hold
        active = (weights != 0).unsqueeze(1)
        kl = torch.where(active.squeeze(1), kl, 0.0)
        lse = torch.where(active, lse, 0.0)
    return kl, lse


def kl_backward(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """``fastunlearn.kernels.kl.kl_backward``."""
    n, vocab = logits.shape
    scale = grad_rows.to(lse.dtype).reshape(-1, 1).expand(n, 1)
    for r0, r1 in row_ranges(n, vocab, logits.device):
        z, r = logits[r0:r1].to(lse.dtype), ref_logits[r0:r1].to(lse.dtype)
        g = (z - lse[r0:r1, :1]).exp_().sub_((r - lse[r0:r1, 1:]).exp_())
        g = torch.where(scale[r0:r1] != 0, g.mul_(scale[r0:r1]), 0.0)
        grad[r0:r1].copy_(g)
    return grad
