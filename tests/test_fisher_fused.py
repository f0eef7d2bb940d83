"""The Fisher pass's loss at the output head (fused, no logits) against the logits path, in fp64.

The two paths differ only in where the NLL is formed: from the last hidden states one chunk of tokens
at a time (:func:`fastunlearn.ops.fused_linear.fused_linear_nll_loss`, ``∂L/∂h`` formed in the forward)
or from the model's ``[B, T, V]`` logits (a model patched with ``fused=False``). Both use the same row
kernels, so in fp64 each per-example gradient agrees to fp64 rounding and the fp32-accumulated
estimates to the fp32 accumulation: rtol 1e-6 (``(k + 2)·u₃₂`` for ``k ≤ 14`` summands, as in
tests/test_fisher.py) and atol 1e-12 of the layer's largest entry (fp64 gradients that nearly cancel).
The chunk is forced small (7 rows) so that chunks straddle examples and padding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.allocations import RecordOutputs
from helpers.fisher import fisher_llama, make_batch, per_example_oracle

import fastunlearn
from fastunlearn.fisher import estimate_fisher
from fastunlearn.ops import fused_linear

VOCAB = 97  # not a multiple of any other dimension: a [B, T, V] tensor is recognisable by its size


@pytest.fixture(scope="module")
def models():
    from helpers.models import tiny_llama

    fused = tiny_llama(VOCAB, seed=3, dtype=torch.float64, intermediate_size=48, attn_implementation="sdpa")
    logits_path = fastunlearn.patch(copy.deepcopy(fused), fused=False)
    return fused, logits_path


def batches():
    # Right padding, prompt labels -100, and one example (row 2 of the second batch) without a label.
    second = make_batch(3, 9, seed=2, pad_rows=[(0, 6)])
    second["labels"][2] = -100
    return [make_batch(4, 12, seed=1, pad_rows=[(1, 8), (3, 5)]), second]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(fused_linear, "CPU_CHUNK_ELEMENTS", 7 * VOCAB)


def assert_estimates_equal(got, want):
    assert list(got) == list(want)
    assert (got.num_examples, got.num_tokens, got.mode) == (want.num_examples, want.num_tokens, want.mode)
    for name in want:
        scale = want[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-12 * scale, msg=name)


@pytest.mark.parametrize("mode", ["per_example", "batch", "token"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_loss_equals_the_logits_path(models, mode, checkpointing):
    fused_model, logits_model = models
    data = batches()
    targets = ["q_proj", "o_proj", "down_proj"]
    options = {"target_modules": targets, "mode": mode, "backend": "torch", "progress": False}
    with RecordOutputs() as record:
        got = estimate_fisher(fused_model, data, gradient_checkpointing=checkpointing, **options)
    with RecordOutputs() as reference:
        want = estimate_fisher(logits_model, data, gradient_checkpointing=checkpointing, **options)
    assert_estimates_equal(got, want)
    # The fused path formed no logits tensor (no output the size of a batch's [B, T, V] logits); the
    # reference did: the two are different paths.
    logits_sizes = {b["input_ids"].numel() * VOCAB for b in data}
    assert not {n for _, _, n in record.outputs} & logits_sizes
    assert {n for _, _, n in reference.outputs} >= logits_sizes


def test_measured_output_head_takes_the_logits_path(models):
    # The head's own output gradient is the [B, T, V] logits' gradient: with lm_head among the measured
    # layers the pass computes the logits, and the estimate is still the per-example definition.
    fused_model, logits_model = models
    data = batches()
    names = ["model.layers.1.mlp.up_proj", "lm_head"]
    got = estimate_fisher(fused_model, data, target_modules=names, backend="torch", progress=False)
    want = estimate_fisher(logits_model, data, target_modules=names, backend="torch", progress=False)
    assert_estimates_equal(got, want)
    oracle, _ = per_example_oracle(fused_model, data, names)
    for name in names:
        scale = oracle[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), oracle[name], rtol=1e-6, atol=1e-12 * scale)


def test_fused_estimate_equals_the_per_example_definition():
    model = fisher_llama(seed=4)
    data = batches()
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj"]
    got = estimate_fisher(model, data, target_modules=names, backend="torch", progress=False)
    oracle, count = per_example_oracle(model, data, names)
    assert got.num_examples == count
    for name in names:
        scale = oracle[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), oracle[name], rtol=1e-6, atol=1e-12 * scale)
