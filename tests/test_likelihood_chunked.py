"""Teacher-forced answer statistics computed at the output head in chunks, against the logits path.

:func:`fastunlearn.ops.fused_linear.fused_linear_token_stats` gives per token ``−log p(y)`` and
``argmax = y`` from the hidden states a chunk of rows at a time; :func:`answer_stats` uses it for
models the fused path supports, so an evaluation batch's ``[B, T, V]`` logits never exist.

Tolerances. fp64: the chunk's logits are the same dot products as the full matmul's (a row's logits
do not depend on the other rows), so they agree to fp64 rounding and the NLL to ``1e-12`` relative.
fp32, against an fp64 reference on the same fp32 inputs: each logit is a dot product of ``H`` terms,
off by at most ``γ_H·Σ_k |h_k w_vk|`` (``γ_H = H·u/(1 − H·u)``, ``u = 2⁻²⁴``); ``−log p_y = lse(z) − z_y``
moves by at most twice the largest logit error, and the kernel's fp32 reductions over ``V`` add
``V·u`` relative to the row's scale. A hit is only compared where the fp64 margin between the best
and the second-best logit exceeds twice the logit error bound (elsewhere rounding may decide).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.allocations import RecordOutputs
from helpers.models import tiny_llama
from references.ihl import nll_oracle_rows

import fastunlearn
from fastunlearn.evaluation import likelihood
from fastunlearn.evaluation.likelihood import answer_stats, token_nll
from fastunlearn.ops import fused_linear
from fastunlearn.ops.fused_linear import fused_linear_token_stats

VOCAB = 97
U32 = 2.0**-24


def problem(n: int, hidden: int, vocab: int, dtype, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).to(dtype)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.25] = -100
    return h, w, b, labels


def reference(h, w, b, labels):
    """fp64 logits of the same inputs, their NLL and argmax hits (0 / False where ignored)."""
    z = h.double() @ w.double().t() + (0 if b is None else b.double())
    nll = nll_oracle_rows(z, labels)[0]
    return z, nll, (z.argmax(-1) == labels)


@pytest.mark.parametrize(
    "dtype, backend",
    [(torch.float64, "torch"), (torch.float32, "torch"), (torch.float32, "triton")],  # Triton: fp32 only
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_token_stats_equal_the_logits(dtype, backend, bias, chunk_rows):
    n, hidden, vocab = 37, 24, 301
    h, w, b, labels = problem(n, hidden, vocab, dtype, seed=chunk_rows, bias=bias)
    nll, hit = fused_linear_token_stats(h, w, labels, bias=b, backend=backend, chunk_rows=chunk_rows)
    assert nll.shape == hit.shape == labels.shape and hit.dtype == torch.bool
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    z, want_nll, want_hit = reference(h, w, b, labels)
    ignored = labels == -100
    assert (nll[ignored] == 0).all() and not hit[ignored].any()
    if dtype == torch.float64:
        logit_err = torch.zeros(n, 1, dtype=torch.float64)
        torch.testing.assert_close(nll, want_nll, rtol=1e-12, atol=1e-12)
    else:
        terms = h.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs())
        gamma = hidden * U32 / (1 - hidden * U32)
        logit_err = gamma * terms.max(-1, keepdim=True).values
        row_scale = z.abs().max(-1).values + want_nll.abs()
        bound = 2 * logit_err.squeeze(-1) + 4 * vocab * U32 * row_scale
        assert ((nll.double() - want_nll).abs() <= bound).all()
    top2 = z.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * logit_err.squeeze(-1)
    assert decided.sum() > n // 2  # the comparison is not vacuous
    assert torch.equal(hit[decided], want_hit[decided])


def test_token_stats_bad_input():
    h, w, _, labels = problem(6, 8, 11, torch.float32, seed=0, bias=False)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_token_stats(h, w.t(), labels)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_linear_token_stats(h, w, labels.clamp_min(0) + 11)
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_token_stats(h, w, labels, chunk_rows=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_answer_stats_at_the_head_equal_the_logits_path(monkeypatch, dtype):
    monkeypatch.setattr(fused_linear, "CPU_CHUNK_ELEMENTS", 7 * VOCAB)  # chunks straddle examples
    model = tiny_llama(VOCAB, seed=5, dtype=dtype, attn_implementation="sdpa").eval()
    logits_model = fastunlearn.patch(copy.deepcopy(model), fused=False)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, VOCAB, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    rows = []
    stats = likelihood.fused_linear_token_stats

    def recorded(hidden, *args, **kwargs):
        rows.append(hidden.shape[0])
        return stats(hidden, *args, **kwargs)

    monkeypatch.setattr(likelihood, "fused_linear_token_stats", recorded)
    with RecordOutputs() as record:
        got = answer_stats(model, batch)
    assert ids.numel() * VOCAB not in {n for _, _, n in record.outputs}  # no [B, T, V] logits
    # Only the labelled positions reach the head: not the prompts, the padding or the last position.
    assert rows == [int((labels[:, 1:] != -100).sum())]
    want = answer_stats(logits_model, batch)
    with torch.no_grad():  # the same statistics from the logits, as token_nll computes them
        logits = logits_model(input_ids=ids, attention_mask=mask).logits
    nll, tokens, hits = token_nll(logits, labels)
    for key, value in (("num_tokens", tokens), ("correct", hits)):
        assert torch.equal(got[key], want[key]) and torch.equal(got[key], value.sum(1))
    # fp64: rounding only; fp32: the NLL of ≤ 8 tokens of a model with logits of order 1, each off by
    # the fp32 forward's rounding (a few hundred u for this 2-layer model) — 1e-5 relative.
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got["nll_sum"], want["nll_sum"], rtol=rtol, atol=rtol)
    torch.testing.assert_close(got["nll_sum"], nll.sum(1), rtol=rtol, atol=rtol)
