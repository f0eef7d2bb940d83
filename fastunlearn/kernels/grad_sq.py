"""Triton kernel for ``F = Σ_n (G_nᵀ X_n)²``, the summed squared per-example weight gradients of a linear
layer (``X_n`` its ``[T, in]`` inputs, ``G_n`` its ``[T, out]`` output gradients for example ``n``).

The square sits between the two sums: the token sum inside ``g_n = G_nᵀ X_n`` must be complete before
squaring. One program owns a ``BLOCK_O × BLOCK_I`` tile of ``F`` and walks the examples in order,
reducing each example's tokens with ``tl.dot`` into an fp32 register tile that is squared and folded
into a second one when the example ends: a GEMM over ``K = B·T`` with no atomics and no
``[B, out, in]`` buffer. The example and token loops are one flattened loop so the pipeliner overlaps
consecutive examples' loads. fp32 inputs use ``input_precision="ieee"`` (TF32 would lose the fp32
reference). Under the interpreter ``tl.dot`` on bf16 is wrong, so bf16 tiles are widened to fp32
(``WIDEN``): a product of two bf16 numbers is exact in fp32, so the result is unchanged.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _grad_sq_kernel(
    x_ptr, g_ptr, out_ptr, B, T, N_IN, N_OUT,
    stride_xb, stride_xt, stride_xi, stride_gb, stride_gt, stride_go, stride_oo, stride_oi,
    ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_O: tl.constexpr,
):  # fmt: skip
    # Grouped tile order (the usual GEMM swizzle): GROUP_O consecutive programs share X's columns in L2.
    pid = tl.program_id(0)
    tiles_o = tl.cdiv(N_OUT, BLOCK_O)
    tiles_i = tl.cdiv(N_IN, BLOCK_I)
    per_group = GROUP_O * tiles_i
    first_o = (pid // per_group) * GROUP_O
    group_rows = tl.minimum(tiles_o - first_o, GROUP_O)
    pid_o = first_o + (pid % per_group) % group_rows
    pid_i = (pid % per_group) // group_rows

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_o = offs_o < N_OUT
    mask_i = offs_i < N_IN
    # G is read as its transpose, an [BLOCK_O, BLOCK_T] tile, so tl.dot(G_tile, X_tile) is G_nᵀ X_n.
    g_cols = g_ptr + offs_o.to(tl.int64)[:, None] * stride_go
    x_cols = x_ptr + offs_i.to(tl.int64)[None, :] * stride_xi
    offs_t = tl.arange(0, BLOCK_T)

    steps_per_example = tl.cdiv(T, BLOCK_T)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # Σ_n g_n²
    grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)  # g_n of the example being reduced
    for step in range(0, B * steps_per_example):
        n = step // steps_per_example
        t = (step - n * steps_per_example) * BLOCK_T + offs_t
        mask_t = t < T
        t64 = t.to(tl.int64)
        n64 = n.to(tl.int64)
        g_tile = tl.load(
            g_cols + n64 * stride_gb + t64[None, :] * stride_gt,
            mask=mask_o[:, None] & mask_t[None, :],
            other=0.0,
        )
        x_tile = tl.load(
            x_cols + n64 * stride_xb + t64[:, None] * stride_xt,
            mask=mask_t[:, None] & mask_i[None, :],
            other=0.0,
        )
        if WIDEN:
            g_tile = g_tile.to(tl.float32)
            x_tile = x_tile.to(tl.float32)
        grad = tl.dot(g_tile, x_tile, grad, input_precision=INPUT_PRECISION)
        if step - n * steps_per_example == steps_per_example - 1:  # the example's last token block
            acc += grad * grad
            grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)

    out_ptrs = out_ptr + offs_o.to(tl.int64)[:, None] * stride_oo + offs_i.to(tl.int64)[None, :] * stride_oi
    mask = mask_o[:, None] & mask_i[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)


# (BLOCK_O, BLOCK_I, BLOCK_T, warps, stages): two fp32 register tiles per program bound the tile at
# 128×128 over 8 warps (4 warps spill).
_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]

_grad_sq_kernel_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t, "GROUP_O": 8}, num_warps=w, num_stages=s)
        for o, i, t, w, s in _CONFIGS
    ],
    # Not keyed on T: it only sets the loop length, and ever-new padded lengths would re-tune each batch.
    key=["N_IN", "N_OUT", "ACCUMULATE", "INPUT_PRECISION", "WIDEN"],
    restore_value=["out_ptr"],  # each tuning run would otherwise add into `out` again
)(_grad_sq_kernel)

# Under the interpreter one small fixed tile (tl.dot needs every dimension ≥ 16; no autotuning).
_INTERPRETER_CONFIG = {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_T": 16, "GROUP_O": 4}


def grad_sq(inputs: torch.Tensor, grad_outputs: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """Write (or, with ``accumulate``, add) ``Σ_n (G_nᵀ X_n)²`` into ``out``: ``inputs`` ``[B, T, in]`` and
    ``grad_outputs`` ``[B, T, out]`` of one dtype (fp32, fp16 or bf16), ``out`` fp32 ``[out, in]``, any
    strides."""
    B, T, n_in = inputs.shape
    n_out = grad_outputs.shape[2]
    interpreted = inputs.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    widen = interpreted and inputs.dtype == torch.bfloat16
    precision = "ieee" if inputs.dtype == torch.float32 or widen else None
    kernel, config = (_grad_sq_kernel, _INTERPRETER_CONFIG) if interpreted else (_grad_sq_kernel_tuned, {})
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_O"]) * triton.cdiv(n_in, meta["BLOCK_I"]),)
    kernel[grid](
        inputs, grad_outputs, out, B, T, n_in, n_out,
        *inputs.stride(), *grad_outputs.stride(), *out.stride(),
        ACCUMULATE=accumulate, INPUT_PRECISION=precision, WIDEN=widen, **config,
    )  # fmt: skip
