"""Triton kernels for the Inverted Hinge Loss (Cha et al. 2025, arXiv 2408.06621) and the token NLL.

For a row of logits ``z ∈ R^V`` with target ``y``, ``p = softmax(z)`` and ``m = argmax_{v≠y} z_v``
(first index on ties), IHL is ``ℓ = 1 + p_y − p_m``. With ``e_v = exp(z_v − M)`` for the row maximum
``M``, ``R = Σ_{v∉{y,m}} e_v`` and ``S = e_y + e_m + R``::

    ℓ        = (2·e_y + R) / S                   (= (1 − p_m) + p_y)
    ∂ℓ/∂z_y  =  p_y · (2·e_m + R) / S             (= p_y·(1 − p_y + p_m))
    ∂ℓ/∂z_m  = −p_m · ℓ
    ∂ℓ/∂z_j  = (p_m − p_y) · p_j                  for j ∉ {y, m}

Memorised tokens have ``p_y ≈ 1``, where ``1 − p_y`` formed by subtraction in fp32 loses every digit;
keeping ``R`` as its own sum makes each quantity a ratio of positive sums. ``R`` is accumulated online:
a block adds the exponentials of its entries but ``y`` and its own arg-max, and whichever of the old
and the block's arg-max loses the running ``m`` joins ``R``. ``p_m − p_y`` is formed as
``e_y·expm1(z_m − z_y)/S`` when the two logits are close.

NLL mode: with ``S_{≠y} = e_m + R``, ``−log p_y = softplus(log S_{≠y} − (z_y − M))``, accurate where
``lse − z_y`` would cancel; its gradient ``p_j − [j = y]`` is the same backward with coefficient 1,
``−S_{≠y}/S`` at ``y`` and ``p_m`` at ``m``.

The forward reads the row once and keeps per row ``lse``, the coefficient of ``p_j``, the two special
gradients and ``m``; the backward reads the row again and writes the gradient. Logits are addressed as
``[B, T, V]`` through arbitrary strides with int64 offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program per row, a block of the vocabulary per iteration: 16k fp32 lanes over 16 warps is 32
# values per thread, large enough to amortise the reductions without spilling.
MAX_BLOCK_V = 16384


@triton.jit
def _expm1(x):
    """``exp(x) − 1`` without cancellation near 0 (libdevice's expm1 fails under the interpreter): a
    degree-8 Taylor polynomial below |x| = 0.5 (relative error < 1e-8), the subtraction above."""
    poly = 1 / 5040 + x / 40320
    poly = 1 / 24 + x * (1 / 120 + x * (1 / 720 + x * poly))
    poly = x * (1.0 + x * (1 / 2 + x * (1 / 6 + x * poly)))
    return tl.where(tl.abs(x) < 0.5, poly, tl.exp(x) - 1.0)


@triton.jit
def _log1p_unit(x):
    """``log(1 + x)`` for ``x ∈ [0, 1]`` (libdevice's log1p fails under the interpreter): ``2·atanh(u)``,
    ``u = x/(2 + x) ≤ 1/3``, by its odd series to ``u¹⁵`` (relative error < 2e-9)."""
    u = x / (2.0 + x)
    w = u * u
    poly = 1 / 11 + w * (1 / 13 + w * (1 / 15))
    poly = 1 / 5 + w * (1 / 7 + w * (1 / 9 + w * poly))
    return 2.0 * u * (1.0 + w * (1 / 3 + w * poly))


@triton.jit
def _round_to_output(x, out_ptr):
    """Cast fp32 ``x`` to ``out_ptr``'s element type, rounding to nearest even: on the bits for bf16,
    which the Triton interpreter would otherwise truncate."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _store_zeros(base, stride, V, BLOCK_V: tl.constexpr):
    """Zeros over a row of ``V`` elements (the gradient of a row that carries no loss)."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        zeros = tl.zeros((BLOCK_V,), dtype=base.dtype.element_ty)
        tl.store(base + offs.to(tl.int64) * stride, zeros, mask=offs < V)


@triton.jit
def _ihl_forward_kernel(
    logits_ptr, labels_ptr, loss_ptr, stats_ptr, argmax_ptr,
    T, V, stride_b, stride_t, stride_v, ignore_index,
    NLL: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    base = logits_ptr + b * stride_b + (row - b * T) * stride_t
    y = tl.load(labels_ptr + row)
    valid = (y != ignore_index) & (y >= 0) & (y < V)
    if valid:
        z_y = tl.load(base + y * stride_v).to(tl.float32)
        run_max = z_y  # max over the whole row, y included: the shift of every exponential
        best = float("-inf")  # max over v ≠ y ...
        best_idx = 0  # ... and its first index
        rest = 0.0  # Σ exp(z_v − shift) over v ∉ {y, best_idx}
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + offs.to(tl.int64) * stride_v, mask=offs < V, other=float("-inf"))
            z = tl.where(offs == y, float("-inf"), z.to(tl.float32))
            blk_best = tl.max(z, axis=0)
            blk_idx = tl.min(tl.where(z == blk_best, offs, V), axis=0)
            new_max = tl.maximum(run_max, blk_best)
            # A row of -inf so far would give exp(-inf - -inf) = nan; shifting by 0 keeps those zeros.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            blk_rest = tl.sum(tl.where(offs == blk_idx, 0.0, tl.exp(z - shift)), axis=0)
            rest = rest * tl.exp(run_max - shift)
            take = blk_best > best  # strict: an earlier index wins ties
            rest += blk_rest + tl.where(take, tl.exp(best - shift), tl.exp(blk_best - shift))
            best_idx = tl.where(take, blk_idx, best_idx)
            best = tl.maximum(best, blk_best)
            run_max = new_max
        shift = tl.where(run_max == float("-inf"), 0.0, run_max)
        e_y = tl.exp(z_y - shift)
        e_m = tl.exp(best - shift)
        inv_s = 1.0 / (e_y + e_m + rest)
        p_m = e_m * inv_s
        tl.store(stats_ptr + row * 4 + 0, shift + tl.log(e_y + e_m + rest))
        tl.store(argmax_ptr + row, best_idx)
        if NLL:
            d = tl.log(e_m + rest) + (shift - z_y)  # log S_{≠y} − z_y
            tl.store(loss_ptr + row, tl.maximum(d, 0.0) + _log1p_unit(tl.exp(-tl.abs(d))))
            tl.store(stats_ptr + row * 4 + 1, 1.0)
            tl.store(stats_ptr + row * 4 + 2, -(e_m + rest) * inv_s)
            tl.store(stats_ptr + row * 4 + 3, p_m)
        else:
            p_y = e_y * inv_s
            loss = (2.0 * e_y + rest) * inv_s
            tl.store(loss_ptr + row, loss)
            # p_m − p_y = e_y·expm1(z_m − z_y)/S: exact when the two logits are close, where e_m − e_y
            # cancels.
            diff = best - z_y
            near = tl.abs(diff) < 0.5
            tl.store(stats_ptr + row * 4 + 1, tl.where(near, e_y * _expm1(diff), e_m - e_y) * inv_s)
            tl.store(stats_ptr + row * 4 + 2, p_y * (2.0 * e_m + rest) * inv_s)
            tl.store(stats_ptr + row * 4 + 3, -p_m * loss)
    else:  # zeros, as the PyTorch path gives: every output element is written
        tl.store(loss_ptr + row, 0.0)
        for k in tl.static_range(4):
            tl.store(stats_ptr + row * 4 + k, 0.0)


@triton.jit
def _ihl_backward_kernel(
    logits_ptr, labels_ptr, stats_ptr, argmax_ptr, grad_rows_ptr, grad_rows_stride, grad_ptr,
    T, V, stride_b, stride_t, stride_v, grad_stride_b, grad_stride_t, grad_stride_v, ignore_index,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    base = logits_ptr + b * stride_b + t * stride_t
    grad_base = grad_ptr + b * grad_stride_b + t * grad_stride_t
    y = tl.load(labels_ptr + row)
    valid = (y != ignore_index) & (y >= 0) & (y < V)
    if valid:
        scale = tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32)
        lse = tl.load(stats_ptr + row * 4 + 0)
        coef = tl.load(stats_ptr + row * 4 + 1) * scale
        g_y = tl.load(stats_ptr + row * 4 + 2) * scale
        g_m = tl.load(stats_ptr + row * 4 + 3) * scale
        m = tl.load(argmax_ptr + row)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            z = tl.load(base + offs.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
            g = coef * tl.exp(z - lse)
            g = tl.where(offs == y, g_y, g)
            g = tl.where(offs == m, g_m, g)
            g = _round_to_output(g, grad_ptr)
            tl.store(grad_base + offs.to(tl.int64) * grad_stride_v, g, mask=in_row)
    else:
        _store_zeros(grad_base, grad_stride_v, V, BLOCK_V)


def _launch_config(vocab: int, max_block: int = MAX_BLOCK_V) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of a one-program-per-row kernel over a vocabulary of ``vocab``."""
    block = min(max_block, triton.next_power_of_2(vocab))
    return block, 4 if block <= 2048 else (8 if block <= max_block // 2 else 16)


def _launch(kernel, rows: int, vocab: int, *args, max_block: int = MAX_BLOCK_V, **constants) -> None:
    """``kernel`` with one program per row over a vocabulary of ``vocab`` (nothing for 0 rows)."""
    if rows:
        block, num_warps = _launch_config(vocab, max_block)
        kernel[(rows,)](*args, **constants, BLOCK_V=block, num_warps=num_warps)


def ihl_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, loss: str = "ihl"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``loss`` (``"ihl"`` or ``"nll"``) of ``logits`` ``[B, T, V]`` (any strides) against flat
    ``labels`` ``[B·T]``: ``(loss [N], stats [N, 4], argmax [N] int32)``, ``stats`` = ``(lse, c,
    ∂ℓ/∂z_y, ∂ℓ/∂z_m)`` with ``c`` the coefficient of ``p_j`` elsewhere; all 0 on ignored rows."""
    B, T, V = logits.shape
    row_loss = torch.empty(B * T, dtype=torch.float32, device=logits.device)
    stats = torch.empty(B * T, 4, dtype=torch.float32, device=logits.device)
    argmax = torch.zeros(B * T, dtype=torch.int32, device=logits.device)
    _launch(
        _ihl_forward_kernel, B * T, V, logits, labels, row_loss, stats, argmax,
        T, V, *logits.stride(), ignore_index, NLL=loss == "nll",
    )  # fmt: skip
    return row_loss, stats, argmax


def ihl_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    argmax: torch.Tensor,
    grad_rows: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """Write ``grad_rows[r]·∂ℓ_r/∂logits[r]`` into ``grad`` (``[B, T, V]``, any strides; may be ``logits``
    itself: each element is read before the same program overwrites it). ``grad_rows``: 0-d or ``[N]``."""
    B, T, V = logits.shape
    rows_stride = 0 if grad_rows.dim() == 0 else grad_rows.stride(0)
    _launch(
        _ihl_backward_kernel, B * T, V, logits, labels, stats, argmax, grad_rows, rows_stride, grad,
        T, V, *logits.stride(), *grad.stride(), ignore_index,
    )  # fmt: skip
    return grad
