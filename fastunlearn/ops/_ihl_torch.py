"""Chunked PyTorch implementation of the IHL and NLL forward and backward: the CPU path.

It computes what ``fastunlearn.kernels.ihl`` computes (the same stored statistics and
cancellation-free formulas; see that module's docstring for the derivation), a block of rows at a
time. Blocks are sized to stay in cache (about a megabyte of fp32), so the few vectorised passes each
block needs (PyTorch's fused softmax does the exponentials) cost little more than the one read of the
logits from memory and the one write of the gradient; the only full-size buffer is the gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements of fp32 work per block. On CPU, 256k floats = 1 MiB, about an L2 cache, so the block's
# passes run from cache. On a GPU (this path is not the GPU default) a block is one launch per op, so
# blocks are large (64M floats = 256 MiB) to keep launch overhead small; still a bounded buffer.
CPU_BLOCK_ELEMENTS = 1 << 18
DEVICE_BLOCK_ELEMENTS = 1 << 26


def _row_blocks(logits: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(first_row, end_row, view)`` covering ``logits`` (``[B, T, V]``) in cache-sized views."""
    B, T, V = logits.shape
    budget = CPU_BLOCK_ELEMENTS if logits.device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    rows = max(1, budget // V)
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            yield b * T + t0, b * T + t1, logits[b, t0:t1]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_targets(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """Positions that carry a loss: not ``ignore_index`` and inside the vocabulary (what every backend,
    the kernels included, treats as a target; out-of-range labels only pass with ``validate=False``)."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def _first_argmax(x: torch.Tensor, row_max: torch.Tensor, width: int = 512) -> torch.Tensor:
    """Index of the first occurrence of ``row_max`` in each row of ``x`` (``[n, 1]``, int64).

    ``torch.max(dim)`` returns values and indices in one pass that is several times slower on CPU than
    ``amax``; two ``amax``-speed passes find the first ``width``-wide segment holding the maximum, then
    the first position inside it.
    """
    n, v = x.shape
    padded = torch.nn.functional.pad(x, (0, -v % width), value=float("-inf")).view(n, -1, width)
    segment = (padded.amax(dim=2) == row_max).int().argmax(dim=1, keepdim=True)
    window = padded.gather(1, segment.unsqueeze(2).expand(n, 1, width)).squeeze(1)
    return segment * width + (window == row_max).int().argmax(dim=1, keepdim=True)


def ihl_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, loss: str = "ihl"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``fastunlearn.kernels.ihl.ihl_forward`` (fp64 logits are kept in fp64).

    Per block, over the logits with ``y`` masked out. IHL: the best other logit ``z_m`` and its
    first index, and ``q = softmax`` (PyTorch's fused kernel), whose entries outside ``m`` sum to
    ``R/S_{≠y}`` exactly — no subtraction; ``log S_{≠y} = z_m − log q_m`` is accurate because
    ``q_m ≥ 1/(V−1)``. NLL: ``log S_{≠y}`` straight from ``logsumexp``; the loss is
    ``softplus(log S_{≠y} − z_y)`` and the target's gradient ``−S_{≠y}/S``, as in the kernel, with the
    target itself standing in for ``m`` (the backward then writes ``∂ℓ/∂z_y`` there twice).
    The per-row arithmetic that turns these into the loss and the stored statistics runs once, over
    all rows, after the loop.
    """
    B, T, V = logits.shape
    acc = _accumulation_dtype(logits.dtype)
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
        row_loss, stats = _ihl_rows(z_y, best, q_m, rest_q)
    # Ignored rows: zero loss and zero coefficients, so the backward writes exact zeros there.
    stats = torch.where(valid, stats, 0.0)
    return torch.where(valid, row_loss, 0.0).squeeze(1), stats, argmax.squeeze(1)


def _ihl_rows(
    z_y: torch.Tensor, best: torch.Tensor, q_m: torch.Tensor, rest_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IHL loss and backward statistics of each row from ``z_y``, ``z_m``, ``q_m`` and ``R/S_{≠y}``."""
    # e_v relative to shift = max(z_y, log S_{≠y}); one of e_y and S_{≠y} is 1 there.
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
    return row_loss, stats


def ihl_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    grad_rows: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """Same contract as ``fastunlearn.kernels.ihl.ihl_backward``."""
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
        # p_j from PyTorch's fused softmax (one vectorised pass, in cache), then one multiply that
        # writes the output block in its own dtype.
        torch.mul(torch.softmax(block, dim=1, dtype=stats.dtype), coef[r0:r1], out=out)
        out.scatter_(1, targets[r0:r1], g_y[r0:r1])
        out.scatter_(1, argmax[r0:r1].unsqueeze(1), g_m[r0:r1])
    return grad
