"""Triton kernel for summed squared per-example weight gradients (SPEC §3.1).

For an ``nn.Linear`` with inputs ``X_n ∈ R^{T×in}`` and output gradients ``G_n ∈ R^{T×out}`` of
example ``n``, the example's weight gradient is ``g_n = G_nᵀ X_n`` and the quantity wanted is::

    F = Σ_n g_n ⊙ g_n                   ([out, in], fp32)

The square sits between the two sums: the token sum (inside ``g_n``) must be complete before squaring,
the example sum may be split anywhere. So one program owns one ``BLOCK_O × BLOCK_I`` tile of ``F``
and walks the examples in order; for each example it reduces over the tokens with ``tl.dot`` into a
register tile (fp32 accumulate), squares it and adds it to a second register tile. The tile of ``F``
is written once. No atomics (no two programs share an output element), no ``[B, out, in]`` buffer
(each ``g_n`` tile lives in registers only while its example is being reduced) and no split of the
token reduction. It is a GEMM over ``K = B·T`` whose accumulator is squared and folded every ``T``
steps, so it has a GEMM's arithmetic intensity: FLOPs ``2·B·T·out·in``.

The example and token loops are flattened into one loop of ``B·⌈T/BLOCK_T⌉`` steps so the software
pipeliner overlaps the loads of one example's first tokens with the previous example's last ones;
the fold happens on the step that ends an example. Tiles are addressed through arbitrary strides with
int64 offsets and masked at every edge, so slices and transposed views need no copy. fp32 inputs are
multiplied with ``input_precision="ieee"``: the fp32 reference would not survive TF32's 10-bit
mantissa.

Interpreter caveat (Triton 3.9, checked): ``tl.dot`` on bf16 operands returns garbage under
``TRITON_INTERPRET=1`` (errors of 1e10 on a 16×16 product) while fp16 and fp32 are exact, so under the
interpreter bf16 tiles are widened to fp32 before the product (``WIDEN``). That changes nothing in the
result: a product of two bf16 numbers is exact in fp32 and the compiled kernel accumulates in fp32 too.
The interpreter does not emulate TF32 either, so the ``"ieee"`` choice is only observable on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _grad_sq_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    B,
    T,
    N_IN,
    N_OUT,
    stride_xb,
    stride_xt,
    stride_xi,
    stride_gb,
    stride_gt,
    stride_go,
    stride_oo,
    stride_oi,
    ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GROUP_O: tl.constexpr,
):
    # Grouped tile order: GROUP_O consecutive programs share the same columns of X, so the rows of X
    # and G they read stay in L2 across the group (the usual GEMM swizzle).
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


def _configs() -> list[triton.Config]:
    # Two fp32 register tiles per program bound the tile at 128×128 (64 + 64 fp32 registers per
    # thread over 8 warps); the token block is the GEMM's K step. Checked by compiling ahead of time for
    # sm_90 (unit feature strides, as the JIT specialises them): every bf16/fp16 config below lowers to
    # wgmma without register spills (121–212 registers); 128×128 over only 4 warps spilled and is out.
    shapes = [
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_O": o, "BLOCK_I": i, "BLOCK_T": t, "GROUP_O": 8}, num_warps=w, num_stages=s)
        for o, i, t, w, s in shapes
    ]


_grad_sq_kernel_tuned = triton.autotune(
    configs=_configs(),
    # Tuned per layer shape (and, implicitly, dtype), not per token count: T only sets the loop length,
    # and batches padded to ever-new lengths would otherwise re-run the tuning on every batch.
    key=["N_IN", "N_OUT", "ACCUMULATE", "INPUT_PRECISION", "WIDEN"],
    # Autotuning runs the kernel several times; with ACCUMULATE each run would add into `out` again.
    restore_value=["out_ptr"],
)(_grad_sq_kernel)

# Under the interpreter (CPU tensors) one small fixed tile: tl.dot needs every dimension ≥ 16, and
# autotuning interpreted kernels would only multiply the (already slow) run time.
_INTERPRETER_CONFIG = {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_T": 16, "GROUP_O": 4}


def grad_sq(inputs: torch.Tensor, grad_outputs: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """Write (or, with ``accumulate``, add) ``Σ_n (G_nᵀ X_n)²`` into ``out``.

    ``inputs`` is ``[B, T, in]`` and ``grad_outputs`` ``[B, T, out]``, both fp32, fp16 or bf16 of the
    same dtype, any strides; ``out`` is a fp32 ``[out, in]`` tensor, any strides, on the same device.
    """
    B, T, n_in = inputs.shape
    n_out = grad_outputs.shape[2]
    interpreted = inputs.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    widen = interpreted and inputs.dtype == torch.bfloat16
    precision = "ieee" if inputs.dtype == torch.float32 or widen else None
    args = (
        inputs, grad_outputs, out, B, T, n_in, n_out,
        *inputs.stride(), *grad_outputs.stride(), *out.stride(),
    )  # fmt: skip
    options = {"ACCUMULATE": accumulate, "INPUT_PRECISION": precision, "WIDEN": widen}
    if not interpreted:
        grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_O"]) * triton.cdiv(n_in, meta["BLOCK_I"]),)
        _grad_sq_kernel_tuned[grid](*args, **options)
        return
    cfg = _INTERPRETER_CONFIG
    grid = (triton.cdiv(n_out, cfg["BLOCK_O"]) * triton.cdiv(n_in, cfg["BLOCK_I"]),)
    _grad_sq_kernel[grid](*args, **options, **cfg)
