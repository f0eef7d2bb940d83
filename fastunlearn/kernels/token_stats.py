"""Triton kernel for the per-token statistics of Min-K%++ (Zhang et al. 2024, arXiv 2404.02936): for logits
``z`` with target ``y`` and ``p = softmax(z)``, ``log p_y``, ``μ = Σ_v p_v log p_v`` and
``σ² = Σ_v p_v (log p_v)² − μ²`` (floored).

``σ² = Var_p(z)``, since ``log p`` and ``z`` differ by a constant. One read of the row keeps the running
maximum ``M``, ``s = Σ_{v≠y} e^{z_v − M}``, ``S = Σ_v e^{z_v − M}``, ``a = Σ_v e^{z_v − M}(z_v − M)`` and
``b = Σ_v e^{z_v − M}(z_v − M)²``; when ``M`` grows by ``−δ ≥ 0``::

    s ← e^δ s,    a ← e^δ (a + δ S),    b ← e^δ (b + 2δ a + δ² S),    S ← e^δ S

(sums of terms of one sign). Then ``E = a/S``, ``μ = E − log S``, ``σ² = b/S − E²`` and
``−log p_y = softplus(log s − (z_y − M))``, accurate as ``p_y → 1``. ``M`` starts at ``z_y``, so every
shift is finite. Rows whose label is ignored (or outside ``[0, V)``) get NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastunlearn.kernels.ihl import _launch, _log1p_unit


@triton.jit
def _token_stats_kernel(
    logits_ptr, labels_ptr, out_ptr, V, stride_n, stride_v, ignore_index, variance_floor,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_n
    y = tl.load(labels_ptr + row)
    if (y != ignore_index) & (y >= 0) & (y < V):
        z_y = tl.load(base + y * stride_v).to(tl.float32)
        run_max = z_y
        s = 0.0
        s_all = 0.0  # Σ e^{z_v − M} over every v read so far: the weight of a and b
        a = 0.0
        b = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + offs.to(tl.int64) * stride_v, mask=offs < V, other=float("-inf"))
            z = z.to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(z, axis=0))
            delta = run_max - new_max
            scale = tl.exp(delta)
            b = scale * (b + 2.0 * delta * a + delta * delta * s_all)
            a = scale * (a + delta * s_all)
            s = scale * s
            s_all = scale * s_all
            finite = z > float("-inf")  # masked lanes and −inf logits: no mass (and no 0·∞)
            d = tl.where(finite, z - new_max, 0.0)
            e = tl.where(finite, tl.exp(d), 0.0)
            ed = e * d
            s += tl.sum(tl.where(offs == y, 0.0, e), axis=0)
            s_all += tl.sum(e, axis=0)
            a += tl.sum(ed, axis=0)
            b += tl.sum(ed * d, axis=0)
            run_max = new_max
        d_y = z_y - run_max
        e_y = tl.exp(d_y)
        gap = tl.log(s) - d_y  # log s − (z_y − M); −inf when no other token has mass
        nll = tl.maximum(gap, 0.0) + _log1p_unit(tl.exp(-tl.abs(gap)))
        total = e_y + s
        log_total = tl.where(gap > 0.0, tl.log(total), d_y + nll)
        mean = a / total
        var = b / total - mean * mean
        tl.store(out_ptr + row * 3 + 0, -nll)
        tl.store(out_ptr + row * 3 + 1, mean - log_total)
        tl.store(out_ptr + row * 3 + 2, tl.sqrt(tl.maximum(var, variance_floor)))
    else:
        tl.store(out_ptr + row * 3 + 0, float("nan"))
        tl.store(out_ptr + row * 3 + 1, float("nan"))
        tl.store(out_ptr + row * 3 + 2, float("nan"))


def token_stats(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, variance_floor: float
) -> torch.Tensor:
    """``[N, 3]`` fp32 ``(log p_y, μ, σ)`` of each row of ``logits`` ``[N, V]`` (any strides) against
    contiguous ``labels`` ``[N]``, with ``σ² ≥ variance_floor``; NaN on ignored rows."""
    n_rows, vocab = logits.shape
    out = torch.empty(n_rows, 3, dtype=torch.float32, device=logits.device)
    _launch(
        _token_stats_kernel, n_rows, vocab, logits, labels, out, vocab, *logits.stride(), ignore_index,
        variance_floor,
    )  # fmt: skip
    return out
