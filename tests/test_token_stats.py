"""Min-K%++ token statistics (``fastunlearn.ops.token_stats``) against the fp64 oracle of
``references/token_stats.py``, on both backends (Triton under the interpreter on CPU).

Tolerances. Each output is fp32 arithmetic on positive sums over the vocabulary (pairwise or blocked
reductions: relative error a few ulps of fp32, 2⁻²⁴ ≈ 6e-8, times the reduction depth) on the same
dtype-rounded logits as the oracle, so bf16 inputs need no more than fp32 ones: rtol 1e-6 on
``log p_y``, ``μ`` and ``σ`` of ordinary rows. Two exceptions, both inherent to fp32 logits:
- confident rows (``p_y → 1``): ``log p_y ≈ −Σ_{v≠y} e^{z_v − z_y}`` and each exponent ``z_v − M``
  rounds to half an ulp of ``|z_v − M|`` ≤ 64, an absolute 2⁻¹⁹ ≈ 2e-6 in the exponent, i.e. a
  relative 2e-6 in ``log p_y``: rtol 1e-5;
- ``μ = E_p[z − M] − log S`` where ``S ≈ 1`` (one token has all the mass): ``log S`` in fp32 is exact
  only to half an ulp of 1, an absolute 6e-8: atol 1e-7 (``z_t``'s numerator ``log p_y − μ`` has an
  absolute error of that order anyway).
"""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import assert_close
from references.token_stats import token_stats_reference

from fastunlearn.ops import _ihl_torch
from fastunlearn.ops.token_stats import linear_token_stats, token_stats

BACKENDS = ["torch", "triton"]
RTOL = 1e-6


def _problem(n: int, vocab: int, dtype: torch.dtype, seed: int, ignore: float = 0.25):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore] = -100
    labels[0] = 1  # at least one row with a target
    return logits, labels


def _check(got, want, rtol=RTOL, atol=0.0, mu_atol=0.0):
    valid = ~torch.isnan(want[0])
    for name, g, w, a in zip(("log p_y", "mu", "sigma"), got, want, (atol, mu_atol, atol)):
        assert g.dtype == torch.float32, name
        assert torch.isnan(g[~valid]).all(), f"{name}: ignored rows must be NaN"
        assert_close(g[valid], w[valid], rtol, a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_match_fp64(backend, dtype, monkeypatch):
    """Odd vocabulary, ignored rows, 13 rows in CPU blocks of 3 rows (not a multiple)."""
    monkeypatch.setattr(_ihl_torch, "CPU_BLOCK_ELEMENTS", 3 * 1031)
    logits, labels = _problem(13, 1031, dtype, seed=1)
    _check(token_stats(logits, labels, backend=backend), token_stats_reference(logits, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_above_65536(backend):
    logits, labels = _problem(2, 70_001, torch.bfloat16, seed=2, ignore=0.0)
    labels[1] = 70_000  # the last entry, in the last (partial) block
    _check(token_stats(logits, labels, backend=backend), token_stats_reference(logits, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_and_strided_logits(backend):
    """``[B, T, V]`` logits sliced along T (no flat view): outputs shaped like the labels."""
    full, flat = _problem(3 * 6, 257, torch.float32, seed=3)
    logits, labels = full.view(3, 6, 257)[:, :5], flat.view(3, 6)[:, :5]
    got = token_stats(logits, labels, backend=backend)
    assert all(g.shape == (3, 5) for g in got)
    want = token_stats_reference(logits.reshape(-1, 257), labels.reshape(-1))
    _check([g.reshape(-1) for g in got], want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [20.0, 40.0])
def test_confident_rows_keep_relative_accuracy(backend, margin):
    """``z_y = max + margin``: ``log p_y`` is −1e-7 … −1e-16 and σ sits at its floor. ``z_y − lse`` in
    fp32 (what log-softmax gives) has no correct digit left; the softplus form keeps them."""
    logits, labels = _problem(6, 997, torch.float32, seed=4, ignore=0.0)
    rows = torch.arange(6)
    logits[rows, labels] = logits.max(-1).values + margin
    want = token_stats_reference(logits, labels)
    _check(token_stats(logits, labels, backend=backend), want, rtol=1e-5, mu_atol=1e-7)
    naive = logits.log_softmax(-1)[rows, labels].double()
    assert ((naive - want[0]).abs() / want[0].abs()).max() > 1e-2  # the check can tell the difference


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_token_has_the_mass_and_masked_vocabulary(backend):
    """One other token far above the rest (``p_y ≈ 0``, ``S ≈ 1``), and ``−inf`` logits (a masked
    vocabulary) that carry no mass."""
    logits, labels = _problem(5, 515, torch.float32, seed=5, ignore=0.0)
    labels[:] = torch.arange(1, 6)
    logits[:, 0] += 30.0
    logits[:, 100:140] = float("-inf")
    want = token_stats_reference(logits, labels)
    _check(token_stats(logits, labels, backend=backend), want, mu_atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_states_matches_the_logits(backend, dtype):
    """``linear_token_stats`` in chunks of 4 tokens (with a bias) = ``token_stats`` of the logits.
    The oracle is fed the logits each chunk computes (``h @ Wᵀ + b`` in the inputs' dtype), so only
    the statistics are compared: same tolerance."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 7, 24, generator=gen).to(dtype)
    weight = (torch.randn(331, 24, generator=gen) / 2).to(dtype)
    bias = torch.randn(331, generator=gen).to(dtype)
    labels = torch.randint(0, 331, (2, 7), generator=gen)
    labels[0, 2] = labels[1, 6] = -100
    got = linear_token_stats(hidden, weight, labels, bias=bias, backend=backend, chunk_rows=4)
    assert all(g.shape == (2, 7) for g in got)
    h = hidden.reshape(-1, 24)
    logits = torch.cat([torch.addmm(bias, h[i : i + 4], weight.t()) for i in range(0, 14, 4)])
    _check([g.reshape(-1) for g in got], token_stats_reference(logits, labels.reshape(-1)))


def test_fp64_stays_fp64_on_the_torch_path():
    logits, labels = _problem(4, 101, torch.float64, seed=7)
    got = token_stats(logits, labels, backend="torch")
    want = token_stats_reference(logits, labels)
    valid = ~torch.isnan(want[0])
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        assert_close(g[valid], w[valid], 1e-12)


def test_custom_op_schema_fake_and_tracing():
    """``fastunlearn::token_stats`` passes ``torch.library.opcheck`` (schema, fake tensor, AOT
    dispatch) and Dynamo traces ``token_stats`` without a graph break."""
    logits, labels = _problem(5, 37, torch.float32, seed=8, ignore=0.0)  # opcheck compares without NaN
    torch.library.opcheck(torch.ops.fastunlearn.token_stats.default, (logits, labels, -100, "torch"))
    compiled = torch.compile(
        lambda z, y: token_stats(z, y, backend="torch", validate=False), backend="eager", fullgraph=True
    )
    labels[2] = -100
    got = compiled(logits, labels)
    want = token_stats(logits, labels, backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num())


def test_bad_input_is_one_clear_error():
    logits, labels = _problem(3, 11, torch.float32, seed=9)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_stats(logits, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="labels must have the shape"):
        token_stats(logits, labels[:2])
    with pytest.raises(TypeError, match="floating-point logits"):
        token_stats(logits.long(), labels)
    with pytest.raises(ValueError, match="unknown backend"):
        token_stats(logits, labels, backend="reference")
