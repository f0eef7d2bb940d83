"""The PyTorch (CPU) path of the row kernels, ``fastunlearn.kernels.ihl`` (IHL and NLL), ``.kl`` and
``.token_stats``: their functions, with their stored statistics and cancellation-free formulas, a
cache-sized block of rows at a time, so the few vectorised passes per block cost little more than one
read of the logits; the only full-size buffer is the gradient. fp64 logits are kept in fp64.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

from fastunlearn.ops._backend import compute_dtype

# fp32 elements per block: 1 MiB (about an L2 cache) on CPU; on a GPU (not this path's default) large
# blocks keep the launch overhead small, still a bounded buffer.
CPU_BLOCK_ELEMENTS = 1 << 18
DEVICE_BLOCK_ELEMENTS = 1 << 26


def implementation(backend: str, kernel: str) -> ModuleType:
    """The module computing ``fastunlearn.kernels.<kernel>``'s functions for a resolved backend: that one
    (importing triton only now) or this one, which offers the same functions."""
    if backend == "triton":
        return importlib.import_module(f"fastunlearn.kernels.{kernel}")
    return sys.modules[__name__]


def row_ranges(n: int, vocab: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """``(first, end)`` row ranges of ``n`` rows of ``vocab`` in blocks of about the budget's size."""
    rows = max(1, (CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS) // vocab)
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _row_blocks(logits: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(first_row, end_row, view)`` covering ``[B, T, V]`` logits in cache-sized ``[rows, V]`` views."""
    B, T, V = logits.shape
    for b in range(B):
        for t0, t1 in row_ranges(T, V, logits.device):
            yield b * T + t0, b * T + t1, logits[b, t0:t1]


def valid_targets(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Positions that carry a loss, for every backend: not ``ignore_index`` and inside the vocabulary."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def _first_argmax(x: torch.Tensor, row_max: torch.Tensor, width: int = 512) -> torch.Tensor:
    """Index ``[n, 1]`` of the first occurrence of ``row_max`` in each row of ``x``: two ``amax``-speed
    passes (``torch.max(dim)`` is several times slower on CPU) find the first ``width``-wide segment
    holding it, then the position inside."""
    n, v = x.shape
    padded = torch.nn.functional.pad(x, (0, -v % width), value=float("-inf")).view(n, -1, width)
    segment = (padded.amax(dim=2) == row_max).int().argmax(dim=1, keepdim=True)
    window = padded.gather(1, segment.unsqueeze(2).expand(n, 1, width)).squeeze(1)
    return segment * width + (window == row_max).int().argmax(dim=1, keepdim=True)


def ihl_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, loss: str = "ihl"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fastunlearn.kernels.ihl.ihl_forward``. Per block, with ``y`` masked out: for IHL the best other
    logit ``z_m``, its first index and ``q = softmax``, whose entries outside ``m`` sum to ``R/S_{≠y}``
    with no subtraction (``log S_{≠y} = z_m − log q_m``, accurate since ``q_m ≥ 1/(V−1)``); for NLL
    ``log S_{≠y}`` from ``logsumexp``, with ``y`` standing in for ``m``."""
    B, T, V = logits.shape
    acc = compute_dtype(logits)
    n = B * T
    nll = loss == "nll"
    device = logits.device
    valid = valid_targets(labels, V, ignore_index).unsqueeze(1)
    targets = torch.where(valid, labels.unsqueeze(1), 0)
    z_y, lse_others, best, q_m, rest_q = (torch.empty(n, 1, dtype=acc, device=device) for _ in range(5))
    argmax = targets if nll else torch.empty(n, 1, dtype=torch.int64, device=device)
    for r0, r1, block in _row_blocks(logits):
        y = targets[r0:r1]
        z = block.to(acc)
        torch.gather(z, 1, y, out=z_y[r0:r1])
        others = z.scatter(1, y, float("-inf"))
        if nll:
            torch.logsumexp(others, dim=1, keepdim=True, out=lse_others[r0:r1])
            continue
        torch.amax(others, dim=1, keepdim=True, out=best[r0:r1])
        idx = _first_argmax(others, best[r0:r1])
        argmax[r0:r1] = idx
        q = others.softmax(dim=1)
        torch.gather(q, 1, idx, out=q_m[r0:r1])
        torch.sum(q.scatter_(1, idx, 0.0), dim=1, keepdim=True, out=rest_q[r0:r1])

    if nll:
        d = lse_others - z_y
        row_loss = d.clamp_min(0) + torch.log1p(torch.exp(-d.abs()))
        lse = torch.logaddexp(lse_others, z_y)
        g_y = -torch.exp(lse_others - lse)
        stats = torch.cat([lse, torch.ones_like(lse), g_y, g_y], dim=1)
    else:
        # Shifted by max(z_y, log S_{≠y}): one of e_y and S_{≠y} is 1.
        lse_others = best - q_m.log()
        shift = torch.maximum(z_y, lse_others)
        e_y = (z_y - shift).exp()
        e_m = (best - shift).exp()
        rest = (lse_others - shift).exp() * rest_q
        total = e_y + e_m + rest
        p_y, p_m = e_y / total, e_m / total
        row_loss = (2 * e_y + rest) / total
        diff = best - z_y
        coef = torch.where(diff.abs() < 0.5, e_y * torch.expm1(diff), e_m - e_y) / total
        stats = torch.cat([shift + total.log(), coef, p_y * (2 * e_m + rest) / total, -p_m * row_loss], dim=1)
    # Ignored rows: zero loss and zero coefficients, so the backward writes exact zeros there.
    stats = torch.where(valid, stats, 0.0)
    return torch.where(valid, row_loss, 0.0).squeeze(1), stats, argmax.squeeze(1)


def ihl_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    grad_rows: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """``fastunlearn.kernels.ihl.ihl_backward``, with ``p_j`` from PyTorch's fused softmax."""
    V = logits.shape[-1]
    valid = valid_targets(labels, V, ignore_index).unsqueeze(1)
    targets = torch.where(valid, labels.unsqueeze(1), 0)
    scale = grad_rows.to(stats.dtype).reshape(-1, 1)  # [1, 1] or [N, 1]
    coef = stats[:, 1:2] * scale
    g_y = (stats[:, 2:3] * scale).to(grad.dtype)
    g_m = (stats[:, 3:4] * scale).to(grad.dtype)
    for r0, r1, block in _row_blocks(logits):
        b, t0 = divmod(r0, logits.shape[1])
        out = grad[b, t0 : t0 + (r1 - r0)]
        torch.mul(torch.softmax(block, dim=1, dtype=stats.dtype), coef[r0:r1], out=out)
        out.scatter_(1, targets[r0:r1], g_y[r0:r1])
        out.scatter_(1, argmax[r0:r1].unsqueeze(1), g_m[r0:r1])
    return grad


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


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, variance_floor: float
) -> torch.Tensor:
    """``fastunlearn.kernels.token_stats.token_stats``, each block's maximum taken at once. A ``−inf``
    logit has ``e = 0`` and ``e·d`` NaN, which ``nansum`` leaves out (NaN logits still give NaN)."""
    n, vocab = logits.shape
    acc = compute_dtype(logits)
    valid = valid_targets(labels, vocab, ignore_index).unsqueeze(1)
    targets = torch.where(valid, labels.unsqueeze(1), 0)
    sums = torch.empty(n, 4, dtype=acc, device=logits.device)  # z_y − M, s (v ≠ y), a, b (every v)
    for r0, r1, block in _row_blocks(logits.unsqueeze(0)):
        d = block.to(acc)
        d = d - d.amax(dim=1, keepdim=True)
        e = d.exp()
        ed = e * d
        torch.gather(d, 1, targets[r0:r1], out=sums[r0:r1, 0:1])
        torch.nansum(ed, dim=1, keepdim=True, out=sums[r0:r1, 2:3])
        torch.nansum(ed * d, dim=1, keepdim=True, out=sums[r0:r1, 3:4])
        torch.sum(e.scatter_(1, targets[r0:r1], 0.0), dim=1, keepdim=True, out=sums[r0:r1, 1:2])
    d_y, s, a, b = sums.unbind(1)
    e_y = d_y.exp()
    gap = s.log() - d_y
    nll = gap.clamp_min(0) + torch.log1p(torch.exp(-gap.abs()))
    total = e_y + s
    log_total = torch.where(gap > 0, total.log(), d_y + nll)
    mean = a / total
    var = b / total - mean * mean
    out = torch.stack([-nll, mean - log_total, var.clamp_min(variance_floor).sqrt()], dim=1)
    return torch.where(valid, out, float("nan"))
