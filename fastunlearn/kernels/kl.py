"""Triton kernels for ``KL(P_ref ‖ P_θ)`` between two rows of logits and its gradient in the θ logits:
the KL retain term of TOFU (Maini et al. 2024, arXiv 2401.06121) and open-unlearning.

For one row with logits ``z`` (the model being trained) and ``r`` (the reference), ``p = softmax(z)``,
``q = softmax(r)``::

    KL(q ‖ p) = Σ_v q_v (log q_v − log p_v) = Σ_v q_v (r_v − z_v) − lse(r) + lse(z)

Forward, one pass over the row: the running maxima ``M_z``, ``M_r``, the rescaled sums
``S_z = Σ e^{z_v − M_z}`` and ``S_r = Σ e^{r_v − M_r}`` of an online log-sum-exp, and
``T = Σ e^{r_v − M_r}·(r_v − z_v)``, rescaled with ``S_r`` whenever ``M_r`` grows. Then::

    KL = T/S_r + (M_z − M_r) + log(S_z / S_r)

has no term of the size of the logits themselves (``lse(z) − lse(r)`` is formed as ``M_z − M_r`` plus a
log of a ratio of sums in ``[1, V]``): the result is exactly 0 for ``z = r``, and its rounding error is
fp32's on quantities of the size of ``|r − z|`` and ``log V``. Entries with ``q_v = 0`` contribute 0
(``0·log 0 = 0``), so a ``−inf`` reference logit is no NaN. Kept per row: ``lse(z)`` and ``lse(r)``.

Backward: ``∂KL/∂z_j = p_j − q_j`` (the reference is a constant), scaled by the row's weight: one more
read of both rows and one write, ``p_j = e^{z_j − lse(z)}``, ``q_j = e^{r_j − lse(r)}``. Rows of weight 0
(masked positions) are skipped in both: KL 0 and a zero gradient, whatever their logits hold.

Rows are addressed through a row and a vocabulary stride (``[N, V]`` views need no copy), with int64
offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunlearn.kernels.ihl import _round_to_output

# Two rows are loaded per iteration: half the IHL kernel's block keeps the same registers per thread.
MAX_BLOCK_V = 8192


@triton.jit
def _kl_forward_kernel(
    z_ptr,
    r_ptr,
    weights_ptr,
    kl_ptr,
    lse_ptr,
    V,
    stride_zn,
    stride_zv,
    stride_rn,
    stride_rv,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = (tl.load(weights_ptr + row) != 0) if HAS_WEIGHTS else (row >= 0)
    if active:
        z_base = z_ptr + row * stride_zn
        r_base = r_ptr + row * stride_rn
        max_z = float("-inf")
        max_r = float("-inf")
        sum_z = 0.0  # Σ exp(z − max_z)
        sum_r = 0.0  # Σ exp(r − max_r)
        cross = 0.0  # Σ exp(r − max_r)·(r − z)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            # Lanes past the row: 0 where the difference r − z is formed, -inf where the maxima and the
            # exponentials are (so no -inf − -inf is ever computed).
            z = tl.load(z_base + offs.to(tl.int64) * stride_zv, mask=in_row, other=0.0).to(tl.float32)
            r = tl.load(r_base + offs.to(tl.int64) * stride_rv, mask=in_row, other=0.0).to(tl.float32)
            z_in = tl.where(in_row, z, float("-inf"))
            r_in = tl.where(in_row, r, float("-inf"))
            new_z = tl.maximum(max_z, tl.max(z_in, axis=0))
            new_r = tl.maximum(max_r, tl.max(r_in, axis=0))
            # A row of -inf so far would give exp(-inf - -inf) = nan; shifting by 0 keeps those zeros.
            shift_z = tl.where(new_z == float("-inf"), 0.0, new_z)
            shift_r = tl.where(new_r == float("-inf"), 0.0, new_r)
            e_r = tl.exp(r_in - shift_r)
            rescale_r = tl.exp(max_r - shift_r)
            sum_z = sum_z * tl.exp(max_z - shift_z) + tl.sum(tl.exp(z_in - shift_z), axis=0)
            sum_r = sum_r * rescale_r + tl.sum(e_r, axis=0)
            cross = cross * rescale_r + tl.sum(tl.where(e_r > 0, e_r * (r - z), 0.0), axis=0)
            max_z = new_z
            max_r = new_r
        shift_z = tl.where(max_z == float("-inf"), 0.0, max_z)
        shift_r = tl.where(max_r == float("-inf"), 0.0, max_r)
        tl.store(kl_ptr + row, cross / sum_r + (shift_z - shift_r) + tl.log(sum_z / sum_r))
        tl.store(lse_ptr + row * 2 + 0, shift_z + tl.log(sum_z))
        tl.store(lse_ptr + row * 2 + 1, shift_r + tl.log(sum_r))
    else:
        tl.store(kl_ptr + row, 0.0)
        tl.store(lse_ptr + row * 2 + 0, 0.0)
        tl.store(lse_ptr + row * 2 + 1, 0.0)


@triton.jit
def _kl_backward_kernel(
    z_ptr,
    r_ptr,
    lse_ptr,
    grad_rows_ptr,
    grad_rows_stride,
    grad_ptr,
    V,
    stride_zn,
    stride_zv,
    stride_rn,
    stride_rv,
    grad_stride_n,
    grad_stride_v,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    grad_base = grad_ptr + row * grad_stride_n
    scale = tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32)
    if scale != 0:
        z_base = z_ptr + row * stride_zn
        r_base = r_ptr + row * stride_rn
        lse_z = tl.load(lse_ptr + row * 2 + 0)
        lse_r = tl.load(lse_ptr + row * 2 + 1)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_row = offs < V
            z = tl.load(z_base + offs.to(tl.int64) * stride_zv, mask=in_row, other=0.0).to(tl.float32)
            r = tl.load(r_base + offs.to(tl.int64) * stride_rv, mask=in_row, other=0.0).to(tl.float32)
            g = scale * (tl.exp(z - lse_z) - tl.exp(r - lse_r))
            g = _round_to_output(g, grad_ptr)
            tl.store(grad_base + offs.to(tl.int64) * grad_stride_v, g, mask=in_row)
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            zeros = tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty)
            tl.store(grad_base + offs.to(tl.int64) * grad_stride_v, zeros, mask=offs < V)


def _launch_config(vocab: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    num_warps = 4 if block <= 2048 else (8 if block <= 4096 else 16)
    return block, num_warps


def kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``KL(softmax(ref_logits) ‖ softmax(logits))`` of two ``[N, V]`` tensors (any strides,
    any float dtypes). ``weights`` (``[N]``, optional): rows of weight 0 are skipped. Returns
    ``(kl [N] fp32, lse [N, 2] fp32)``, ``lse`` holding ``(lse(z), lse(r))`` for :func:`kl_backward`;
    skipped rows get 0 in both."""
    n, vocab = logits.shape
    kl = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    if n == 0:
        return kl, lse
    block, num_warps = _launch_config(vocab)
    _kl_forward_kernel[(n,)](
        logits, ref_logits, kl if weights is None else weights, kl, lse,
        vocab, *logits.stride(), *ref_logits.stride(),
        HAS_WEIGHTS=weights is not None, BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip
    return kl, lse


def kl_backward(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Write ``grad_rows[r]·(softmax(z_r) − softmax(r_r))`` into ``grad`` (``[N, V]``, any strides; zeros
    where ``grad_rows`` is 0). ``grad_rows`` is 0-d (one scale) or ``[N]``. ``grad`` may be ``logits``
    itself: each element is read before it is overwritten, by the same program."""
    n, vocab = logits.shape
    if n == 0:
        return grad
    rows_stride = 0 if grad_rows.dim() == 0 else grad_rows.stride(0)
    block, num_warps = _launch_config(vocab)
    _kl_backward_kernel[(n,)](
        logits, ref_logits, lse, grad_rows, rows_stride, grad,
        vocab, *logits.stride(), *ref_logits.stride(), *grad.stride(),
        BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip
    return grad
