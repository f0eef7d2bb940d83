"""Correctness of the Triton kernels on a CUDA device, against fp64 references computed on the device.

The reference of the row losses is the package's PyTorch path run on fp64 logits: it keeps them in fp64
with the same cancellation-free formulas, and the tests check it against closed-form fp64 oracles to
1e-12 (``tests/test_ihl.py``, ``tests/test_nll.py``).

Run by ``benchmarks/gpu_run.sh`` before the GPU benchmarks. Each check draws fresh random inputs,
poisons the allocator with NaN first (so an element the kernel forgets to write shows up), and reports
the worst element: ``max |got − want| / (rtol·|want| + atol)`` over every element, which must be ≤ 1.
The per-element tolerances are the tests' (``tests/test_ihl.py``, where they are derived): the loss in
fp32, rtol 1e-5; the gradient rtol 1e-5 in fp32, plus half an ulp of the logits' dtype when it is
bf16 (2⁻⁸) or fp16 (2⁻¹¹, and 2⁻²⁵ absolute for entries that underflow). The Fisher kernel's check
(``bench_fisher.check_triton``) is element-wise against its own derived bound. Exits non-zero on
failure.

``--dry-run`` runs the same checks at small sizes on CPU tensors under the Triton interpreter, to try
the script before spending device time on it.
"""

from __future__ import annotations

# ruff: noqa: E402  (the interpreter switch must precede the imports that may load triton)
import os
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch

from fastunlearn import fused_linear_nll_loss, ihl_loss, kl_loss, nll_loss

LOSSES = {"ihl": ihl_loss, "nll": nll_loss}

DEVICE = "cpu" if DRY_RUN else "cuda"

# Per element, |got − want| ≤ rtol·|want| + atol: (rtol, atol) of the gradient, by logits dtype.
GRAD_TOL = {
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (2.0**-8 + 1e-5, 0.0),
    torch.float16: (2.0**-11 + 1e-5, 2.0**-25),
}
LOSS_TOL = (1e-5, 0.0)


def worst_element(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    """``max |got − want| / (rtol·|want| + atol)`` over every element (inf if any is not finite)."""
    got = got.detach().double().reshape(want.shape)
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    bound = (rtol * want.abs() + atol).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((got - want).abs() / bound).max()) if want.numel() else 0.0


def fp64_rows(loss_name: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row loss and logits gradient (for a unit upstream gradient) in fp64, from the PyTorch path."""
    z = logits.detach().double().requires_grad_()
    rows = LOSSES[loss_name](z, labels, backend="torch", reduction="none", validate=False)
    rows.backward(torch.ones_like(rows))
    return rows.detach(), z.grad


def poison_allocator(nbytes: int) -> None:
    """Fill the caching allocator's free blocks with NaN so unwritten outputs cannot pass."""
    block = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE)
    block.fill_(float("nan"))
    del block


def check_rows(
    n: int, vocab: int, dtype: torch.dtype, *, loss_name: str = "ihl", confident: bool = False, seed: int = 0
) -> bool:
    """``ihl_loss`` or ``nll_loss`` (the kernels' two modes), per-token loss and gradient."""
    loss_fn = LOSSES[loss_name]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(n, vocab, device=DEVICE, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=DEVICE, generator=gen)
    labels[::7] = -100
    if confident:
        rows = torch.arange(n, device=DEVICE)
        logits[rows, labels.clamp_min(0)] = (logits.float().amax(-1) + 25).to(dtype)  # ignored rows too
    poison_allocator(2 * logits.numel() * logits.element_size())
    x = logits.clone().requires_grad_()
    loss = loss_fn(x, labels, backend="triton", reduction="none")
    grad_out = torch.rand(n, device=DEVICE, generator=gen) + 0.5
    loss.backward(grad_out)
    want_loss, want_grad = fp64_rows(loss_name, logits, labels)
    want_grad *= grad_out.double()[:, None]
    ok = True
    for name, got, want, tol in (
        ("loss", loss, want_loss, LOSS_TOL),
        ("grad", x.grad, want_grad, GRAD_TOL[dtype]),
    ):
        worst = worst_element(got, want, *tol)
        ok &= worst <= 1
        case = f"{loss_name} n={n} V={vocab} {dtype} {'confident ' if confident else ''}{name}"
        print(f"  {case}: worst element {worst:.3g} of its tolerance -> {'ok' if worst <= 1 else 'FAIL'}")
    return ok


def check_fused_linear_nll(n: int, hidden: int, vocab: int) -> bool:
    """``fused_linear_nll_loss`` in bf16 (Triton rows, chunked bf16 matmuls) against the fp64 loss of
    the same bf16 inputs. The one check judged in norm rather than per element: each chunk's logits are
    a bf16 matmul (2⁻⁸ relative per logit, cancelling in ∂h = Σ_v g_v W_v), so an element of ∂h near 0
    has no meaningful relative bound; 1e-2 in norm is a few bf16 roundings."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    h = torch.randn(n, hidden, device=DEVICE, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device=DEVICE, generator=gen) * hidden**-0.5 * 3).bfloat16()
    labels = torch.randint(0, vocab, (n,), device=DEVICE, generator=gen)
    labels[::5] = -100
    loss = fused_linear_nll_loss(h, w, labels, backend="triton", chunk_rows=max(1, n // 3))
    loss.backward()
    want_rows, want_grad = fp64_rows("nll", h.detach().double() @ w.double().t(), labels)
    valid = labels != -100
    want_h = (want_grad / valid.sum()) @ w.double()
    ok = True
    for name, got, want in (
        ("loss", loss.detach(), want_rows.sum() / valid.sum()),
        ("grad_h", h.grad, want_h),
    ):
        rel = float((got.double() - want).norm() / want.norm())
        passed = bool(torch.isfinite(got).all()) and rel <= 1e-2
        ok &= passed
        print(f"  fused_linear_nll n={n} H={hidden} V={vocab} bf16 {name}: rel err {rel:.2e} -> "
              f"{'ok' if passed else 'FAIL'}")  # fmt: skip
    return ok


def check_ihl_large_offsets() -> bool:
    """N·V ≥ 2³¹ in bf16: rows past the 32-bit offset range must still be right."""
    n, vocab = 16400, 131072  # 2.15e9 elements, 4.3 GB
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = (torch.randn(n, vocab, device=DEVICE, generator=gen) * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=DEVICE, generator=gen)
    x = logits.requires_grad_()
    ihl_loss(x, labels, backend="triton", reduction="sum").backward()
    tail = slice(n - 64, n)  # these rows start beyond element 2^31
    _, want = fp64_rows("ihl", logits[tail], labels[tail])
    worst = worst_element(x.grad[tail], want, *GRAD_TOL[torch.bfloat16])
    print(f"  ihl N*V={n * vocab:.3g} bf16, last 64 rows: worst element {worst:.3g} of its tolerance "
          f"-> {'ok' if worst <= 1 else 'FAIL'}")  # fmt: skip
    return worst <= 1


def check_kl(n: int, vocab: int, dtype: torch.dtype) -> bool:
    """``kl_loss`` on the Triton kernels against the PyTorch path on fp64 logits, with a mask. The
    tolerances are the tests' (``tests/test_kl.py``): the loss within ``2e-6·(2·max|r − z| + 1)`` per
    row of weight, each gradient element within ``1e-5·w·(p_j + q_j)`` plus half an ulp of its dtype."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    ref = torch.randn(n, vocab, device=DEVICE, generator=gen) * 3
    logits = (ref + torch.randn(n, vocab, device=DEVICE, generator=gen)).to(dtype)
    ref = ref.to(dtype)
    mask = torch.rand(n, device=DEVICE, generator=gen) > 0.2
    poison_allocator(2 * logits.numel() * logits.element_size())
    x = logits.clone().requires_grad_()
    kl_loss(x, ref, mask, backend="triton").backward()
    z = logits.double().requires_grad_()
    want = kl_loss(z, ref.double(), mask, backend="torch")
    want.backward()
    weights = mask.double() / mask.sum()
    spread = (ref.double() - logits.double()).abs().amax(-1)
    loss_bound = 2e-6 * float(((2 * spread + 1) * weights).sum())
    got = kl_loss(logits, ref, mask, backend="triton").double()
    p_plus_q = logits.double().softmax(-1) + ref.double().softmax(-1)
    rtol, atol = GRAD_TOL[dtype]
    bound = 1e-5 * p_plus_q * weights[:, None] + (rtol - 1e-5) * z.grad.abs() + atol
    err = (x.grad.double() - z.grad).abs()
    worst = max(float((got - want.detach()).abs()) / loss_bound,
                float((err / bound.clamp_min(torch.finfo(torch.float64).tiny)).max()))  # fmt: skip
    finite = bool(torch.isfinite(x.grad).all())
    print(f"  kl n={n} V={vocab} {dtype}: worst element {worst:.3g} of its tolerance -> "
          f"{'ok' if worst <= 1 and finite else 'FAIL'}")  # fmt: skip
    return worst <= 1 and finite


def main() -> int:
    if not DRY_RUN and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run to try the checks on CPU under the Triton interpreter)")
        return 1
    print(f"device: {torch.cuda.get_device_name() if not DRY_RUN else 'CPU, Triton interpreter (dry run)'}")
    shrink = 16 if DRY_RUN else 1
    ok = True
    for n, vocab, dtype in [
        (257, 32003, torch.float32),
        (130, 131079, torch.bfloat16),
        (300, 50257, torch.float16),
        (64, 7, torch.float32),
    ]:
        for loss_name in LOSSES:
            ok &= check_rows(max(2, n // shrink), vocab, dtype, loss_name=loss_name)
    for loss_name in LOSSES:
        ok &= check_rows(200 // shrink, 32000, torch.float32, loss_name=loss_name, confident=True)
    ok &= check_fused_linear_nll(max(2, 600 // shrink), 256, 32003)
    for n, vocab, dtype in [(257, 32003, torch.float32), (130, 131079, torch.bfloat16)]:
        ok &= check_kl(max(2, n // shrink), vocab, dtype)
    if not DRY_RUN:
        ok &= check_ihl_large_offsets()
    from bench_fisher import gpu_check as fisher_check  # the Fisher kernel's own check

    ok &= bool(fisher_check(dry_run=DRY_RUN))
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
