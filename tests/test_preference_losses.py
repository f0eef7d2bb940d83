"""npo_loss, simnpo_loss, dpo_loss and rmu_loss against fp64 references written from their other forms
(``references.preference``): values and gradients, for ``grad_output ≠ 1``.

Tolerances. The losses are computed in fp32 from fp32 (or exactly widened bf16) inputs; the oracle sees
the same values. NPO/SimNPO/DPO: each sequence's term is ``softplus(x)`` of an argument ``x`` formed by
at most three roundings (``|Δx| ≤ 3·2⁻²⁴·|x|``); as ``σ(x) ≤ softplus(x)`` everywhere, ``softplus`` moves by
``σ(x)·|Δx| ≤ 3·2⁻²⁴·|x|·softplus(x)``, so with ``logsigmoid``'s own few ulps the relative error stays
below ``(3|x| + 4)·2⁻²⁴``: ``6e-6`` for ``|x| ≤ 30``, which the inputs below keep to; the mean over ``B``
adds ``B·2⁻²⁴``. So rtol 1e-5 on the loss and on every gradient element (autograd's fp32 ``σ``).
RMU: a mean of ``d`` squares per position and of ``n`` positions per
sequence, ``(d + n + b)·2⁻²⁴`` relative: rtol 1e-5 with ``d = 24``. bf16 inputs: the gradients are those
fp32 values rounded once to bf16, half an ulp more (``2⁻⁸`` relative).
"""

from __future__ import annotations

import pytest
import torch
from references.preference import dpo_reference, npo_reference, rmu_reference, simnpo_reference

from fastunlearn import dpo_loss, npo_loss, rmu_loss, simnpo_loss

GRAD_OUT = 0.61
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8 + 1e-5}


def sequences(n, dtype, seed, scale=40.0):
    """Per-sequence log-probabilities of answers of 5–40 tokens, and their counts."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(5, 40, (n,), generator=gen)
    logp = -(torch.rand(n, generator=gen) * scale + 1) * counts / 20
    return logp.to(dtype), counts


def check(ours, reference, inputs, dtype):
    """Our loss and gradients against the fp64 reference's, on copies of the same inputs."""
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_leaves = [t.double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    loss, want = ours(*leaves), reference(*ref_leaves)
    loss.backward(torch.tensor(GRAD_OUT))
    want.backward(torch.tensor(GRAD_OUT, dtype=torch.float64))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    return leaves, ref_leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_npo(dtype):
    logp, _ = sequences(9, dtype, seed=1)
    ref_logp = (logp.float() + torch.randn(9, generator=torch.Generator().manual_seed(2)) * 30).to(dtype)
    ours, reference = lambda a, b: npo_loss(a, b, beta=0.3), lambda a, b: npo_reference(a, b, 0.3)
    (got, ref), (want, _) = check(ours, reference, [logp, ref_logp], dtype)
    assert ref.grad is None  # the reference is a constant
    torch.testing.assert_close(got.grad.double(), want.grad, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_simnpo(dtype):
    logp, counts = sequences(11, dtype, seed=3)
    counts[4] = 0  # no targets: N̄ = 0
    logp[4] = 0
    (got, _), (want, _) = check(
        lambda a, n: simnpo_loss(a, n, beta=2.5, delta=0.4),
        lambda a, n: simnpo_reference(a, n, 2.5, 0.4),
        [logp, counts],
        dtype,
    )
    torch.testing.assert_close(got.grad.double(), want.grad, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dpo(dtype):
    chosen, _ = sequences(7, dtype, seed=4)
    rejected, _ = sequences(7, dtype, seed=5)
    gen = torch.Generator().manual_seed(6)
    ref_chosen = (chosen.float() + torch.randn(7, generator=gen) * 20).to(dtype)
    ref_rejected = (rejected.float() + torch.randn(7, generator=gen) * 20).to(dtype)
    leaves, ref_leaves = check(lambda *a: dpo_loss(*a, beta=0.2), lambda *a: dpo_reference(*a, 0.2),
                               [chosen, ref_chosen, rejected, ref_rejected], dtype)  # fmt: skip
    for i in (0, 2):
        torch.testing.assert_close(leaves[i].grad.double(), ref_leaves[i].grad, rtol=RTOL[dtype], atol=0)
    assert leaves[1].grad is None and leaves[3].grad is None


def test_defaults_are_the_papers():
    logp, counts = sequences(5, torch.float32, seed=7)
    ref = logp + 3
    pairs = [
        (npo_loss(logp, ref), npo_reference(logp, ref, 0.1)),
        (simnpo_loss(logp, counts), simnpo_reference(logp, counts, 4.5, 0.0)),
        (dpo_loss(logp, ref, ref, logp), dpo_reference(logp, ref, ref, logp, 0.1)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_shape", ["vector", "activations"])
def test_rmu(dtype, target_shape):
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(3, 6, 24, generator=gen).to(dtype)
    target = (
        torch.randn(24, generator=gen) * 6.5
        if target_shape == "vector"
        else torch.randn(3, 6, 24, generator=gen)
    )
    target = target.to(dtype)
    mask = torch.rand(3, 6, generator=gen) > 0.4
    mask[1] = False  # a sequence without targets contributes 0
    mask[0, 0] = True
    (got, tgt, _), (want, _, _) = check(rmu_loss, rmu_reference, [hidden, target, mask], dtype)
    assert tgt.grad is None
    torch.testing.assert_close(got.grad.double(), want.grad, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize(
    ("fn", "args", "error", "match"),
    [
        (npo_loss, (torch.zeros(3), torch.zeros(4)), ValueError, "one shape"),
        (npo_loss, (torch.zeros(3, 1), torch.zeros(3, 1)), ValueError, "1-D"),
        (npo_loss, (torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "floating"),
        (npo_loss, (torch.zeros(3), torch.zeros(3), 0.0), ValueError, "beta"),
        (simnpo_loss, (torch.zeros(3), torch.ones(3, dtype=torch.bool)), TypeError, "n_tokens"),
        (dpo_loss, (torch.zeros(3),) * 3 + ([0.0] * 3,), TypeError, "ref_rejected_logp must be a tensor"),
        (rmu_loss, (torch.zeros(2, 3, 4), torch.zeros(5), torch.ones(2, 3)), ValueError, "broadcast"),
        (rmu_loss, (torch.zeros(2, 3, 4), torch.zeros(4), torch.ones(3, 2)), ValueError, "mask"),
        (rmu_loss, (torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)), TypeError, r"\[b, L, d\]"),
    ],
)
def test_bad_input(fn, args, error, match):
    with pytest.raises(error, match=match):
        fn(*args)
