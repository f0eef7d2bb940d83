"""Triton kernels for the Inverted Hinge Loss (Cha et al., ICLR 2025, §3.1; SPEC §2) and the NLL.

For one row of logits ``z ∈ R^V`` with target ``y``, ``p = softmax(z)`` and
``m = argmax_{v≠y} z_v`` (first index on ties)::

    ℓ = 1 + p_y − p_m

Write ``e_v = exp(z_v − M)`` for the row maximum ``M``, ``R = Σ_{v∉{y,m}} e_v`` and
``S = e_y + e_m + R``. Then, with no subtraction anywhere::

    ℓ        = (2·e_y + R) / S                        (= (1 − p_m) + p_y)
    ∂ℓ/∂z_y  =  p_y · (2·e_m + R) / S                  (= p_y·(1 − p_y + p_m))
    ∂ℓ/∂z_m  = −p_m · ℓ                               (= −p_m·(1 − p_m + p_y))
    ∂ℓ/∂z_j  = (p_m − p_y) · p_j                       for j ∉ {y, m}

Memorised forget-set tokens have ``p_y ≈ 1``; computing ``1 − p_y`` by subtraction in fp32 loses every
digit once ``1 − p_y`` falls below ~1e-7. Keeping ``R`` (the mass outside ``{y, m}``) as its own sum
makes every quantity above a ratio of positive sums, accurate to a few fp32 ulps however confident the
row is. ``R`` is accumulated online: each block contributes the exponentials of all its entries except
``y`` and the block's own arg-max; when a block's arg-max takes over as the running ``m``, the old
``m``'s exponential joins ``R``, otherwise the block's arg-max does.

The one remaining difference, ``p_m − p_y``, is formed as ``e_y·expm1(z_m − z_y)/S`` when the two
logits are close, where ``e_m − e_y`` would cancel.

Forward: one read of the row, all arithmetic in fp32, and five numbers kept per row for the backward
(``lse``, ``p_m − p_y``, the two special gradients, and ``m``) — never the probabilities.
Backward: one more read of the row and one write of the gradient, ``p_j = exp(z_j − lse)``.

NLL mode (``NLL=True``). The forward's single pass already holds every statistic the negative
log-likelihood needs (SPEC §2: "other objectives share the same per-row statistics"): with
``S_{≠y} = e_m + R``, ``−log p_y = log(1 + S_{≠y}/e_y) = softplus(log S_{≠y} − (z_y − M))``, formed
as ``max(d, 0) + log1p(exp(−|d|))`` so a confident row (``p_y → 1``, loss ``≈ S_{≠y}/e_y``) keeps its
relative accuracy where ``lse − z_y`` would cancel. Its gradient ``p_j − [j = y]`` fits the same
backward: coefficient 1 on ``p_j``, ``−S_{≠y}/S`` at ``y`` (again no ``1 − p_y``) and ``p_m`` at ``m``.

Logits are addressed as ``[B, T, V]`` with arbitrary strides, so a shifted slice such as
``logits[:, :-1]`` needs no copy; row offsets are computed in int64 so ``N·V ≥ 2³¹`` is safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program per row; a block of the vocabulary per loop iteration. 16k fp32 lanes over 16 warps is
# 32 values per thread: large blocks amortise the per-iteration reductions without spilling.
MAX_BLOCK_V = 16384


@triton.jit
def _expm1(x):
    """``exp(x) − 1`` without cancellation near 0 (libdevice's expm1 fails under the interpreter).

    Below |x| = 0.5 a degree-8 Taylor polynomial (relative truncation error < 1e-8); above, the
    subtraction loses at most a couple of ulps.
    """
    poly = 1 / 5040 + x / 40320
    poly = 1 / 24 + x * (1 / 120 + x * (1 / 720 + x * poly))
    poly = x * (1.0 + x * (1 / 2 + x * (1 / 6 + x * poly)))
    return tl.where(tl.abs(x) < 0.5, poly, tl.exp(x) - 1.0)


@triton.jit
def _log1p_unit(x):
    """``log(1 + x)`` for ``x ∈ [0, 1]`` (libdevice's log1p fails under the interpreter).

    ``log(1 + x) = 2·atanh(u)`` with ``u = x/(2 + x) ≤ 1/3``: the odd series to ``u¹⁵`` leaves a
    relative truncation error below 2e-9, and there is no ``1 + x`` to lose small ``x`` in.
    """
    u = x / (2.0 + x)
    w = u * u
    poly = 1 / 11 + w * (1 / 13 + w * (1 / 15))
    poly = 1 / 5 + w * (1 / 7 + w * (1 / 9 + w * poly))
    return 2.0 * u * (1.0 + w * (1 / 3 + w * poly))


@triton.jit
def _round_to_output(x, out_ptr):
    """Cast fp32 ``x`` to ``out_ptr``'s element type with round-to-nearest-even.

    For bf16 the rounding is done on the bits: GPUs round either way, but the Triton interpreter
    truncates fp32 → bf16, which would make CPU tests see a bias of up to one bf16 ulp.
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(out_ptr.dtype.element_ty)


@triton.jit
def _ihl_forward_kernel(
    logits_ptr,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    argmax_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    ignore_index,
    NLL: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
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
    logits_ptr,
    labels_ptr,
    stats_ptr,
    argmax_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    grad_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    grad_stride_b,
    grad_stride_t,
    grad_stride_v,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
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
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty)
            tl.store(grad_base + offs.to(tl.int64) * grad_stride_v, zeros, mask=offs < V)


def _launch_config(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, num_warps


def ihl_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, loss: str = "ihl"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss of ``logits`` (``[B, T, V]``, any strides) against flat ``labels`` (``[B·T]``).

    ``loss``: ``"ihl"`` or ``"nll"``. Returns ``(loss [N] fp32, stats [N, 4] fp32, argmax [N]
    int32)``; ``stats`` holds ``(lse, c, ∂ℓ/∂z_y, ∂ℓ/∂z_m)`` for :func:`ihl_backward`, whose gradient
    is ``c·p_j`` away from ``y`` and ``m = argmax`` (``c = p_m − p_y`` for IHL, 1 for NLL). Ignored
    rows get loss, statistics and ``argmax`` 0.
    """
    B, T, V = logits.shape
    n_rows = B * T
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n_rows, 4, dtype=torch.float32, device=logits.device)
    argmax = torch.zeros(n_rows, dtype=torch.int32, device=logits.device)
    if n_rows == 0:
        return row_loss, stats, argmax
    block, num_warps = _launch_config(V)
    _ihl_forward_kernel[(n_rows,)](
        logits, labels, row_loss, stats, argmax,
        T, V, *logits.stride(), ignore_index,
        NLL=loss == "nll", BLOCK_V=block, num_warps=num_warps,
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
    """Write ``grad_rows[r] · ∂ℓ_r/∂logits[r]`` (IHL or NLL, as ``stats`` says) into ``grad``
    (``[B, T, V]``, any strides).

    ``grad_rows`` is a 0-d tensor (one scale for every row) or a ``[N]`` tensor. ``grad`` may be
    ``logits`` itself: each element is read before it is overwritten, by the same program.
    """
    B, T, V = logits.shape
    if B * T == 0:
        return grad
    rows_stride = 0 if grad_rows.dim() == 0 else grad_rows.stride(0)
    block, num_warps = _launch_config(V)
    _ihl_backward_kernel[(B * T,)](
        logits, labels, stats, argmax, grad_rows, rows_stride, grad,
        T, V, *logits.stride(), *grad.stride(), ignore_index,
        BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip
    return grad
