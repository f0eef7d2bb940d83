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
