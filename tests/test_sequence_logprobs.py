"""sequence_logprobs against a loop of fp64 log-softmaxes (``references.preference``), on both backends.

Tolerances: each token's ``−log p`` comes from the NLL row kernels, accurate to ``1e-5`` relative in fp32
(tests/test_nll.py); a sequence's sum of such positive terms keeps that relative accuracy (its fp32
additions add ``T·2⁻²⁴``). The logits' gradient is the NLL's per-token gradient times the sequence's
upstream gradient: ``helpers.oracles.GRAD_TOL`` (fp32 ``1e-5``; bf16/fp16 plus half an ulp of the stored
value).
"""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import GRAD_TOL, assert_close
from references.preference import sequence_logprobs_reference

from fastunlearn import sequence_logprobs

BACKENDS = ["torch", "triton"]


def problem(batch, length, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :1] = -100  # the prompt
    labels[-1, -1] = -100  # padding
    labels[0] = -100  # a sequence without targets
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("batch", "length", "vocab"), [(3, 7, 11), (3, 5, 32003), (2, 4, 70001)])
def test_matches_fp64_log_softmax(backend, dtype, batch, length, vocab):
    logits, labels = problem(batch, length, vocab, dtype, seed=batch * length)
    x = logits.clone().requires_grad_()
    logp, counts = sequence_logprobs(x, labels, backend=backend)
    grad_out = torch.rand(batch, generator=torch.Generator().manual_seed(1)) + 0.5
    logp.backward(grad_out)
    ref = logits.double().requires_grad_()
    want, want_counts = sequence_logprobs_reference(ref, labels)
    want.backward(grad_out.double())
    assert logp.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts, want_counts) and counts[0] == 0 and logp[0] == 0
    assert_close(logp, want, 1e-5)
    assert_close(x.grad, ref.grad, *GRAD_TOL[dtype])


def test_custom_ignore_index():
    logits, labels = problem(2, 6, 13, torch.float32, seed=3)
    labels = labels.masked_fill(labels == -100, 12)  # 12: inside the vocabulary, and ignored
    logp, counts = sequence_logprobs(logits, labels, ignore_index=12, backend="torch")
    want, want_counts = sequence_logprobs_reference(logits, labels, ignore_index=12)
    assert torch.equal(counts, want_counts)
    assert_close(logp, want, 1e-5)


@pytest.mark.parametrize(
    ("logits", "labels", "error", "match"),
    [
        (torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long), ValueError, r"\[B, T, V\]"),
        (torch.randn(10, 7), torch.zeros(10, dtype=torch.long), ValueError, r"\[B, T, V\]"),
        (torch.randn(2, 5, 7), torch.full((2, 5), 7), ValueError, "label 7 is outside"),
        (torch.randn(2, 5, 7), [[0] * 5] * 2, TypeError, "expects tensors"),
    ],
)
def test_bad_input(logits, labels, error, match):
    with pytest.raises(error, match=match):
        sequence_logprobs(logits, labels)
