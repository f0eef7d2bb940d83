"""Min-K%++ token statistics (Zhang et al. 2024) from the full fp64 distribution: the oracle of
``fastunlearn.ops.token_stats``."""

from __future__ import annotations

import torch


def token_stats_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """``(log p_y, μ, σ)`` per row of ``[N, V]`` logits in fp64: ``μ = Σ p log p``,
    ``σ = sqrt(max(Σ p (log p)² − μ², 1e-6))``; NaN where the label is ignored.

    ``log p_v = (z_v − z_y) − log(1 + Σ_{u≠y} e^{z_u − z_y})``, written with ``log1p``: exact algebra,
    and unlike ``log_softmax`` (``z_y − lse``) it keeps the digits of ``log p_y ≈ −10⁻¹⁴`` when the
    target has nearly all the mass. Logits must be within a few hundred of each other (fp64 ``exp``).
    """
    z = logits.double()
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(-1)
    rel = z - z.gather(-1, y)
    others = rel.scatter(-1, y, float("-inf")).exp().sum(-1, keepdim=True)
    log_p = rel - torch.log1p(others)
    p = log_p.exp()
    p_log_p = torch.where(p > 0, p * log_p, 0.0)  # 0·log 0 = 0 at −inf logits
    mu = p_log_p.sum(-1)
    second = torch.where(p > 0, p_log_p * log_p, 0.0).sum(-1)
    sigma = (second - mu**2).clamp_min(1e-6).sqrt()
    log_py = log_p.gather(-1, y).squeeze(-1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return tuple(torch.where(valid, x, nan) for x in (log_py, mu, sigma))
