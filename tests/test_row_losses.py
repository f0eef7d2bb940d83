"""What the two row losses of the IHL kernels (IHL and its NLL mode) share, checked for both against
their fp64 oracles (SPEC §2 for IHL, ``−log p_y`` for NLL) on every fused backend.

Tolerances, per element, ``|got − want| ≤ rtol·|want| + atol`` against the oracle evaluated on the
*same* (dtype-rounded) logits:
- the loss is returned in fp32 and formed from ratios of positive fp32 sums: rtol 1e-5 (fp32 rounding,
  ~1e-7 per operation, amplified by |z − lse| ≲ 30 inside ``exp``);
- gradients are that fp32 result rounded once to the logits' dtype: half an ulp (2⁻⁸ bf16, 2⁻¹¹ fp16)
  on top of the fp32 error, and fp16 adds half its smallest subnormal (2⁻²⁵) for entries that
  underflow (``helpers.oracles.GRAD_TOL``).
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
from helpers import oracles
from helpers.oracles import GRAD_TOL, assert_close, random_problem
from references.ihl import ihl_oracle_rows, nll_oracle_rows

from fastunlearn import ihl_loss, nll_loss

FUSED = ["torch", "triton"]
SHAPES = [(13, 7), (9, 32003), (3, 70001)]  # small odd vocabulary, Llama-2-ish, above 65536
LOSSES = {"ihl": (ihl_loss, ihl_oracle_rows), "nll": (nll_loss, nll_oracle_rows)}


@pytest.fixture(params=sorted(LOSSES))
def loss(request):
    """``(name, run, expected)`` for one loss: ``run(logits, labels, backend, reduction, grad_out)`` and
    ``expected(logits, labels, reduction, grad_out, ignore_index)`` bound to it."""
    fn, oracle_rows = LOSSES[request.param]
    return request.param, functools.partial(oracles.run, fn), functools.partial(oracles.expected, oracle_rows)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "vocab"), SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_fp64_oracle(loss, backend, dtype, n, vocab, reduction):
    name, run, expected = loss
    # A seed per case that is the same in every process (hash() of a str is salted per process).
    seed = zlib.crc32(f"{name}-{n}-{vocab}-{dtype}-{reduction}-{backend}".encode())
    logits, labels = random_problem(n, vocab, dtype, seed=seed)
    got_loss, grad, grad_out = run(logits, labels, backend, reduction)
    want_loss, want_grad = expected(logits, labels, reduction, grad_out)
    assert got_loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(got_loss, want_loss, 1e-5)
    assert_close(grad, want_grad, *GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", FUSED)
def test_3d_and_non_contiguous_logits(loss, backend):
    _, run, expected = loss
    gen = torch.Generator().manual_seed(14)
    full = torch.randn(3, 9, 333, generator=gen) * 2
    labels = torch.randint(0, 333, (3, 8), generator=gen)
    labels[0, :3] = -100
    shifted = full[:, :-1]  # the causal shift: a strided [B, T, V] slice, no flat view
    got_loss, grad, grad_out = run(shifted, labels, backend, "mean")
    want_loss, want_grad = expected(shifted, labels, "mean", grad_out)
    assert_close(got_loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)

    columns = torch.randn(333, 10, generator=gen).t()  # vocabulary stride ≠ 1
    col_labels = torch.randint(0, 333, (10,), generator=gen)
    got_loss, grad, grad_out = run(columns, col_labels, backend, "sum")
    want_loss, want_grad = expected(columns, col_labels, "sum", grad_out)
    assert_close(got_loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(loss, backend, reduction):
    _, run, _ = loss
    logits = torch.randn(5, 2, 50)
    labels = torch.full((5, 2), -100)
    got_loss, grad, _ = run(logits, labels, backend, reduction)
    assert torch.equal(got_loss.detach(), torch.zeros_like(got_loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", FUSED)
def test_custom_ignore_index_and_int32_labels(loss, backend):
    _, run, expected = loss
    logits, labels = random_problem(20, 77, torch.float32, seed=15, ignore_frac=0)
    labels[::3] = 5  # ignore_index inside the vocabulary: those rows carry no loss
    got_loss, grad, grad_out = run(logits, labels.int(), backend, "mean", ignore_index=5)
    want_loss, want_grad = expected(logits, labels, "mean", grad_out, ignore_index=5)
    assert_close(got_loss, want_loss, 1e-5)
    assert_close(grad, want_grad, 1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_inplace_backward_reuses_logits_storage(loss, backend):
    name, run, _ = loss
    logits, labels = random_problem(12, 1001, torch.bfloat16, seed=16)
    _, want_grad, _ = run(logits, labels, backend, "mean")
    x = logits.clone().requires_grad_()
    scores = x * 1  # a non-leaf, as logits out of a model are
    LOSSES[name][0](scores, labels, backend=backend, inplace_backward=True).backward(torch.tensor(0.37))
    assert torch.equal(scores.detach(), want_grad)  # the logits' storage now holds the gradient
    assert torch.equal(x.grad, want_grad)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", FUSED)
def test_non_finite_logits_propagate(loss, backend):
    _, run, _ = loss
    logits, labels = random_problem(4, 64, torch.float32, seed=17, ignore_frac=0)
    logits[1, 3] = float("nan")
    logits[2, :] = float("inf")
    got_loss, _, _ = run(logits, labels, backend, "none")
    assert torch.isnan(got_loss[1]) and torch.isnan(got_loss[2])
    assert torch.isfinite(got_loss[[0, 3]]).all()


def test_bad_labels_are_named(loss):
    name, _, _ = loss
    fn = LOSSES[name][0]
    with pytest.raises(TypeError, match=f"{name}_loss expects a tensor"):
        fn([1.0, 2.0], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="label 10 is outside"):
        fn(torch.randn(4, 10), torch.tensor([0, 1, 10, 2]))
