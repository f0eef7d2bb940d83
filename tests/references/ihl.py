"""The IHL and NLL losses and their gradients per row in fp64 closed form: the oracles every path of
the row losses is checked against.

From the Inverted Hinge Loss's definition (Cha et al., ICLR 2025), with ``p = softmax(z)``, ``y`` the
target and ``m`` the most likely other token (first index on ties),

    ℓ = 1 + p_y − p_m = (1 − p_m) + p_y,
    ∂ℓ/∂z_j = (p_m − p_y)·p_j          for j ∉ {y, m},
    ∂ℓ/∂z_y = p_y·((1 − p_y) + p_m),   ∂ℓ/∂z_m = −p_m·((1 − p_m) + p_y),

where every ``1 − p`` is formed as the sum of the other probabilities: by subtraction even fp64 loses
every digit once a row is confident enough (margin 40: ``1 − p_y ≈ 1e-15``).
"""

from __future__ import annotations

import torch

__all__ = ["ihl_oracle_rows", "nll_oracle_rows"]


def ihl_oracle_rows(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row IHL loss and its gradient in fp64, from the closed form above.

    ``logits`` is ``[N, V]``, ``labels`` ``[N]``. ``1 − p_y`` and ``1 − p_m`` are sums of the other
    probabilities: by subtraction even fp64 loses every digit once a row is confident enough
    (margin 40: ``1 − p_y ≈ 1e-15``). Returns ``(loss [N], grad [N, V], valid [N])``.
    """
    z = logits.detach().double()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < z.shape[-1])
    ys = torch.where(valid, labels, 0)
    p = z.softmax(-1)
    rows = torch.arange(z.shape[0], device=z.device)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    m = z.index_put((rows, ys), neg_inf).argmax(-1)  # first index on ties
    p_y, p_m = p[rows, ys], p[rows, m]
    not_y = p.index_put((rows, ys), zero).sum(-1)
    not_m = p.index_put((rows, m), zero).sum(-1)
    loss = torch.where(valid, not_m + p_y, 0.0)
    grad = (p_m - p_y)[:, None] * p
    grad[rows, ys] = p_y * (not_y + p_m)
    grad[rows, m] = -p_m * (not_m + p_y)
    grad[~valid] = 0
    return loss, grad, valid


def nll_oracle_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Per-row NLL ``−log p_y`` and its gradient ``p − onehot(y)`` in fp64, cancellation-free.

    With ``d = log Σ_{v≠y} e^{z_v} − z_y``, ``−log p_y = log(1 + e^d)`` (``logaddexp(d, 0)``) and
    ``1 − p_y = Σ_{v≠y} p_v``: exact however confident the row. Returns ``(loss [N], grad [N, V],
    valid [N])``.
    """
    z = logits.detach().double()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < z.shape[-1])
    ys = torch.where(valid, labels, 0)
    rows = torch.arange(z.shape[0], device=z.device)
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    d = z.index_put((rows, ys), neg_inf).logsumexp(-1) - z[rows, ys]
    loss = torch.where(valid, torch.logaddexp(d, torch.zeros_like(d)), 0.0)
    p = z.softmax(-1)
    grad = p.clone()
    grad[rows, ys] = -p.index_put((rows, ys), torch.zeros((), dtype=z.dtype)).sum(-1)
    grad[~valid] = 0
    return loss, grad, valid
