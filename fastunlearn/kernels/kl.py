"""Triton kernels for ``KL(softmax(r) ‖ softmax(z))`` between a row of reference logits ``r`` and the trained
model's ``z``, and its gradient ``p − q`` in ``z``: the KL retain term of TOFU (Maini et al. 2024, arXiv
2401.06121).

One forward pass keeps online log-sum-exps of both rows (maxima ``M_z``, ``M_r``, sums ``S_z``, ``S_r``)
and ``C = Σ e^{r_v − M_r}·(r_v − z_v)``, rescaled whenever ``M_r`` grows; then

    KL = C/S_r + (M_z − M_r) + log(S_z / S_r)

has no term of the logits' own size: it is exactly 0 for ``z = r``, and ``q_v = 0`` entries contribute 0
(a ``−inf`` reference logit is no NaN). Kept per row: ``lse(z)``, ``lse(r)``. Rows of weight 0 (masked
positions) are skipped: KL 0 and a zero gradient, whatever their logits hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunlearn.kernels.ihl import _launch, _round_to_output, _store_zeros

# Two rows per iteration: half the IHL kernel's block keeps the same registers per thread.
MAX_BLOCK_V = 8192


@triton.jit
def _kl_forward_kernel(
    z_ptr, r_ptr, weights_ptr, kl_ptr, lse_ptr, V, stride_zn, stride_zv, stride_rn, stride_rv,
    HAS_WEIGHTS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
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
    z_ptr, r_ptr, lse_ptr, grad_rows_ptr, grad_rows_stride, grad_ptr,
    V, stride_zn, stride_zv, stride_rn, stride_rv, grad_stride_n, grad_stride_v,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
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
        _store_zeros(grad_base, grad_stride_v, V, BLOCK_V)


def kl_forward(
    logits: torch.Tensor, ref_logits: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KL of two ``[N, V]`` tensors (any strides and float dtypes), skipping rows of ``weights``
    0: ``(kl [N], lse [N, 2])`` in fp32, ``lse`` = ``(lse(z), lse(r))``, 0 on skipped rows."""
    n, vocab = logits.shape
    kl = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    _launch(
        _kl_forward_kernel, n, vocab, logits, ref_logits, kl if weights is None else weights, kl, lse,
        vocab, *logits.stride(), *ref_logits.stride(), HAS_WEIGHTS=weights is not None, max_block=MAX_BLOCK_V,
    )  # fmt: skip
    return kl, lse


def kl_backward(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    lse: torch.Tensor,
    grad_rows: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """Write ``grad_rows[r]·(softmax(z_r) − softmax(r_r))`` into ``grad`` (``[N, V]``, any strides; may be
    ``logits``). ``grad_rows``: 0-d or ``[N]``; rows where it is 0 get zeros."""
    n, vocab = logits.shape
    rows_stride = 0 if grad_rows.dim() == 0 else grad_rows.stride(0)
    _launch(
        _kl_backward_kernel, n, vocab, logits, ref_logits, lse, grad_rows, rows_stride, grad,
        vocab, *logits.stride(), *ref_logits.stride(), *grad.stride(), max_block=MAX_BLOCK_V,
    )  # fmt: skip
    return grad
