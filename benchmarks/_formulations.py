"""Eager formulations the benchmarks time as baselines: what users write without fastunlearn.

- :func:`ihl_reference`: the Inverted Hinge Loss (Cha et al., ICLR 2025, arXiv 2408.06621) written
  plainly with eager PyTorch ops and differentiated by autograd;
- :func:`ihl_paper_formulation`: IHL as the paper's code computes it (full softmax, one-hot mask,
  masked ``[N, V−1]`` copy);
- :func:`per_example_grad_sq_reference`: ``Σ_n (G_nᵀ X_n)²`` by materialising every per-example
  gradient, as per-sample-gradient libraries do for sequence inputs.

They are not part of the package. The tests check them against fp64 oracles (through
``tests/references/formulations.py``), so a comparison with them compares like with like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ihl_paper_formulation", "ihl_reference", "per_example_grad_sq_reference"]


def ihl_reference(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """``1 + p_y − max_{v≠y} p_v`` per target token with eager ops; ``mean`` over the non-ignored
    tokens, ``sum`` or ``none``.

    Computes in fp32 (fp64 for fp64 input). It materialises the ``[N, V]`` softmax and a masked copy
    and, through autograd, forms ``1 − p_y`` by subtraction: fine in fp64, lossy in fp32 for confident
    rows. Out-of-range labels count as ignored.
    """
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < z.shape[-1])
    y = torch.where(valid, labels, 0).unsqueeze(-1)
    p = z.softmax(dim=-1)
    p_y = p.gather(-1, y).squeeze(-1)
    m = z.scatter(-1, y, float("-inf")).argmax(dim=-1, keepdim=True)  # first index on ties
    p_m = p.gather(-1, m).squeeze(-1)
    loss = torch.where(valid, 1 + p_y - p_m, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def ihl_paper_formulation(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """IHL as the paper's code computes it, mean reduction only.

    Softmax over the full ``[N, V]`` logits in their own dtype, a one-hot mask, the target
    probabilities picked by the mask and a masked ``[N, V−1]`` copy of the others for their maximum.
    """
    V = logits.shape[-1]
    flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    keep = flat_labels != ignore_index
    probs = F.softmax(flat_logits[keep], dim=-1)
    one_hot = F.one_hot(flat_labels[keep], V).bool()
    p_y = probs[one_hot]
    p_others = probs[~one_hot].view(-1, V - 1)
    return (1 + p_y - p_others.max(dim=-1).values).mean()


def per_example_grad_sq_reference(inputs: Tensor, grad_outputs: Tensor) -> Tensor:
    """``Σ_n (G_nᵀ X_n)²`` by materialising every ``g_n`` at once (``einsum`` into ``[B, out, in]``).

    Computes in fp32 (fp64 for fp64 operands) and returns fp32. ``[B, T, features]`` or ``[B, features]``
    operands.
    """
    dtype = torch.float64 if torch.float64 in (inputs.dtype, grad_outputs.dtype) else torch.float32
    x, g = inputs.to(dtype), grad_outputs.to(dtype)
    if x.dim() == 2:
        x, g = x.unsqueeze(1), g.unsqueeze(1)
    return torch.einsum("bto,bti->boi", g, x).square().sum(dim=0).float()
