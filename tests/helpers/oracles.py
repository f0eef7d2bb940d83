"""Comparisons against fp64 oracles (the IHL oracle itself is :mod:`fastunlearn.ops.oracle`, which
``benchmarks/gpu_check.py`` uses too)."""

from __future__ import annotations

import torch


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """Every element within ``rtol·|want| + atol``, and finite; reports the worst offender."""
    got, want = got.detach().double().reshape(want.shape), want.detach().double()
    err = (got - want).abs()
    bound = rtol * want.abs() + atol
    assert torch.isfinite(got).all(), "non-finite values in the result"
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} of {err.numel()} elements off; worst at {worst}: "
        f"got {got.flatten()[worst].item():.9g}, want {want.flatten()[worst].item():.9g}"
    )


# Gradient tolerances (rtol, atol) by input dtype: the stored gradient is rounded once to the input
# dtype (half an ulp: 2^-8 bf16, 2^-11 fp16) on top of fp32 accumulation (~1e-5 relative).
GRAD_TOL = {
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (2.0**-8 + 1e-5, 0.0),
    torch.float16: (2.0**-11 + 1e-5, 2.0**-25),
}


def random_problem(n, vocab, dtype, seed, *, ignore_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return logits, labels
