"""Compile the row-loss kernels (IHL/NLL and KL) for a GPU architecture ahead of time, on a machine
without a GPU.

It proves the kernels lower for the target (sm_90 by default: H100/H200) and reports whether the
logits are read and the gradient written with vector instructions (``ld/st.global.v4``), under the
specialisations the JIT makes at run time: unit vocabulary stride, and 16-divisible row strides and
pointers when the vocabulary size is a multiple of 16 (``aligned``) or not (``unaligned``, e.g.
V = 50257, where each row starts at an arbitrary address and only scalar access is possible).

    python benchmarks/aot_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastunlearn.kernels import ihl, kl

POINTERS = {
    "logits_ptr", "labels_ptr", "loss_ptr", "stats_ptr", "argmax_ptr", "grad_rows_ptr", "grad_ptr",
    "z_ptr", "r_ptr", "weights_ptr", "kl_ptr", "lse_ptr",
}  # fmt: skip
ROW_STRIDES = {
    "T", "V", "stride_b", "stride_t", "grad_stride_b", "grad_stride_t", "stride_zn", "stride_rn",
    "grad_stride_n",
}  # fmt: skip
UNIT_STRIDES = ("stride_v", "grad_stride_v", "stride_zv", "stride_rv")


def signature(kernel, dtype: str) -> dict[str, str]:
    types = {
        "logits_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "labels_ptr": "*i64", "loss_ptr": "*fp32",
        "stats_ptr": "*fp32", "argmax_ptr": "*i32", "grad_rows_ptr": "*fp32", "z_ptr": f"*{dtype}",
        "r_ptr": f"*{dtype}", "weights_ptr": "*fp32", "kl_ptr": "*fp32", "lse_ptr": "*fp32",
        "stride_zv": "constexpr", "stride_rv": "constexpr", "HAS_WEIGHTS": "constexpr",
        "stride_v": "constexpr", "grad_stride_v": "constexpr", "BLOCK_V": "constexpr", "NLL": "constexpr",
        "stride_b": "i64", "grad_stride_b": "i64",
    }  # fmt: skip
    return {name: types.get(name, "i32") for name in kernel.arg_names}


def compile_kernel(
    kernel, max_block: int, dtype: str, block: int, aligned: bool, arch: int, flags: dict[str, bool]
) -> str:
    sig = signature(kernel, dtype)
    divisible = POINTERS | (ROW_STRIDES if aligned else set())
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name in divisible}
    constexprs = {name: 1 for name in UNIT_STRIDES if name in sig} | {"BLOCK_V": block} | flags
    num_warps = ihl._launch_config(block, max_block)[1]
    source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return compiled.asm["ptx"]


# (module, kernel, its constexpr flags, label)
VARIANTS = [
    (ihl, ihl._ihl_forward_kernel, {"NLL": False}, ""),
    (ihl, ihl._ihl_forward_kernel, {"NLL": True}, " (NLL)"),
    (ihl, ihl._ihl_backward_kernel, {}, ""),
    (kl, kl._kl_forward_kernel, {"HAS_WEIGHTS": True}, ""),
    (kl, kl._kl_backward_kernel, {}, ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default: 90)")
    args = parser.parse_args()
    print(f"{'kernel':<28}{'dtype':<6}{'BLOCK_V':>8}  {'rows':<10}{'vector ld':>10}{'vector st':>10}")
    for module, kernel, flags, label in VARIANTS:
        name = kernel.fn.__name__ + label
        for dtype in ("fp32", "bf16", "fp16"):
            for block in (2048, module.MAX_BLOCK_V):
                for aligned in (True, False):
                    ptx = compile_kernel(kernel, module.MAX_BLOCK_V, dtype, block, aligned, args.arch, flags)
                    loads = len(re.findall(r"ld\.global[.\w:]*\.v[24]", ptx))
                    stores = len(re.findall(r"st\.global[.\w:]*\.v[24]", ptx))
                    rows = "aligned" if aligned else "unaligned"
                    print(f"{name:<28}{dtype:<6}{block:>8}  {rows:<10}{loads:>10}{stores:>10}")


if __name__ == "__main__":
    main()
