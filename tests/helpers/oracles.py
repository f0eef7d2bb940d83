"""Comparisons against fp64 oracles (the row losses' oracles themselves are in :mod:`references.ihl`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

OracleRows = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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


def expected(oracle_rows: OracleRows, logits, labels, reduction, grad_out, ignore_index=-100):
    """The fp64 loss and logits gradient of a row loss reduced like the fused losses reduce it: ``mean``
    over the rows that are not ignored (no NaN when every row is), ``sum``, or ``none`` with a
    per-row ``grad_out``."""
    loss_rows, grad_rows, valid = oracle_rows(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index
    )
    if reduction == "none":
        return loss_rows.view(labels.shape), grad_rows * grad_out.double().reshape(-1, 1)
    count = max(int(valid.sum()), 1) if reduction == "mean" else 1
    return loss_rows.sum() / count, grad_rows * float(grad_out) / count


def run(
    loss_fn: Callable[..., torch.Tensor], logits, labels, backend, reduction="mean", grad_out=None, **kwargs
):
    """The loss and the logits' gradient for ``grad_out`` (0.37, or a per-row random one for ``none``:
    a gradient of 1 would hide a missing scale)."""
    x = logits.clone().requires_grad_()
    loss = loss_fn(x, labels, backend=backend, reduction=reduction, **kwargs)
    if grad_out is None:
        grad_out = torch.tensor(0.37) if reduction != "none" else torch.rand(labels.shape) + 0.5
    loss.backward(grad_out)
    return loss, x.grad, grad_out
