"""Chunked PyTorch implementation of the IHL forward and backward: the CPU path.

It computes exactly what ``fastunlearn.kernels.ihl`` computes (same stored statistics, same
cancellation-free formulas; see that module's docstring for the derivation), a block of rows at a
time. Blocks are sized to stay in cache (about a megabyte of fp32), so the several elementwise passes
each block needs cost little more than the one read of the logits from memory and the one write of
the gradient; the only full-size buffer is the gradient itself.
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


def _valid(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def ihl_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``fastunlearn.kernels.ihl.ihl_forward`` (fp64 logits are kept in fp64)."""
    B, T, V = logits.shape
    acc = _accumulation_dtype(logits.dtype)
    loss = torch.empty(B * T, dtype=acc, device=logits.device)
    stats = torch.empty(B * T, 4, dtype=acc, device=logits.device)
    argmax = torch.empty(B * T, dtype=torch.int64, device=logits.device)
    for r0, r1, block in _row_blocks(logits):
        valid = _valid(labels[r0:r1], V, ignore_index).unsqueeze(1)
        y = torch.where(valid, labels[r0:r1].unsqueeze(1), 0)
        z = block.to(acc)
        z_y = z.gather(1, y)
        others = z.scatter(1, y, float("-inf"))
        best, best_idx = others.max(dim=1, keepdim=True)
        shift = torch.maximum(best, z_y)
        shift = shift.masked_fill(shift == float("-inf"), 0.0)
        others.sub_(shift).exp_()
        others.scatter_(1, best_idx, 0.0)  # R excludes m exactly: no e_m to subtract later
        rest = others.sum(dim=1, keepdim=True)
        e_y = (z_y - shift).exp_()
        e_m = (best - shift).exp_()
        total = e_y + e_m + rest
        p_y, p_m = e_y / total, e_m / total
        row_loss = (2 * e_y + rest) / total
        out = stats[r0:r1]
        # Ignored rows: lse = +inf and zero coefficients make the backward write exact zeros.
        out[:, 0:1] = torch.where(valid, shift + total.log(), float("inf"))
        diff = best - z_y
        coef = torch.where(diff.abs() < 0.5, e_y * torch.expm1(diff), e_m - e_y) / total
        out[:, 1:2] = torch.where(valid, coef, 0.0)
        out[:, 2:3] = torch.where(valid, p_y * (2 * e_m + rest) / total, 0.0)
        out[:, 3:4] = torch.where(valid, -p_m * row_loss, 0.0)
        loss[r0:r1] = torch.where(valid, row_loss, 0.0).squeeze(1)
        argmax[r0:r1] = best_idx.squeeze(1)
    return loss, stats, argmax


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
    acc = stats.dtype
    direct = grad.dtype == acc  # fp32 gradient: compute straight into the output block
    grad_rows = grad_rows.to(acc)
    for r0, r1, block in _row_blocks(logits):
        scale = grad_rows if grad_rows.dim() == 0 else grad_rows[r0:r1].unsqueeze(1)
        lse, coef, g_y, g_m = (s.unsqueeze(1) for s in stats[r0:r1].unbind(1))
        valid = _valid(labels[r0:r1], V, ignore_index).unsqueeze(1)
        y = torch.where(valid, labels[r0:r1].unsqueeze(1), 0)
        b, t0 = divmod(r0, logits.shape[1])
        out = grad[b, t0 : t0 + (r1 - r0)]
        work = out if direct else torch.empty(block.shape, dtype=acc, device=block.device)
        torch.sub(block, lse, out=work)
        work.exp_().mul_(coef * scale)
        work.scatter_(1, y, g_y * scale)
        work.scatter_(1, argmax[r0:r1].unsqueeze(1), g_m * scale)
        if not direct:
            out.copy_(work)
    return grad
