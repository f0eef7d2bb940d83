"""Unlearning objectives against plain fp64 references: loss values and parameter gradients.

The objectives are computed by the patched model (``fastunlearn.patch``), fused (from the last hidden
states) or on the logits path (``fused=False``, the oracle the fused path is held to). Two checks:

- each path against the objective written out on fp64 logits (:mod:`helpers.methods`), on an fp32
  model: the loss to fp32 rounding of the row statistics (rtol 1e-5), the parameter gradients to fp32
  rounding through the model's backward (rtol 1e-4 plus 1e-6 absolute, for entries formed by
  cancellation);
- the two paths against each other on an fp64 model, where both compute the same sums in different
  orders (the chunked ``G·W`` and ``Gᵀh`` against autograd through the logits): each entry is a sum
  of at most a few thousand fp64 products (V·B·T), off by at most that many units of fp64 rounding
  (2⁻⁵³ ≈ 1.1e-16) of its terms' magnitudes, so 1e-11 of the tensor's largest entry (a bound with a
  margin of ~10x for the few layers the error passes through) — a missing term or wrong scale is off
  by O(1).
"""

import math

import pytest
import torch
from helpers.methods import ref_objective, ref_seq_logp
from helpers.models import tiny_llama
from helpers.oracles import assert_close
from transformers import LlamaForCausalLM

import fastunlearn
from fastunlearn.methods.objectives import METHODS, method_loss, npo_loss, sequence_logprobs

V = 53  # odd vocabulary


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    return tiny_llama(V, seed=seed, dtype=dtype)


def random_batch(g: torch.Generator, lengths: list[int], prompt: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; the first ``prompt`` tokens and the padding carry label -100."""
    T = max(lengths)
    input_ids = torch.randint(V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def method_batch(g: torch.Generator, model, method: str) -> dict:
    batch = {
        "forget": random_batch(g, [9, 6, 8], prompt=3),
        "retain": random_batch(g, [5, 7, 7, 4], prompt=2),
    }
    if method == "ga":
        del batch["retain"]
    # A reference that differs from the current model, so the NPO ratio is not 1.
    with torch.no_grad():
        ref = ref_seq_logp(model, batch["forget"]).float()
    batch["forget"]["ref_logp"] = ref + torch.tensor([0.5, -1.25, 2.0])
    return batch


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("method", METHODS)
def test_method_loss_and_gradients_match_fp64_reference(method, fused):
    g = torch.Generator().manual_seed(11)
    model = tiny_model()
    beta = 0.37
    batch = method_batch(g, model, method)
    fastunlearn.patch(model, fused=fused, backend="torch")

    loss, parts = method_loss(model, batch, method, npo_beta=beta)
    loss.backward()
    got = grads(model)
    expected = ref_objective(model, batch, method, beta)
    expected.backward()
    want = grads(model)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    total = parts["forget_loss"] + parts.get("retain_loss", 0)
    torch.testing.assert_close(total, loss.detach())
    assert ("retain_loss" in parts) == (method != "ga")
    for a, b in zip(got, want, strict=True):
        # fp32 forward/backward through the model against an fp64 loss head.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().max() > 0 for a in got)


@pytest.mark.parametrize("wrap", ["full", "lora"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_path_equals_the_logits_path_in_fp64(method, wrap):
    """Same objective, parts and gradients with and without the logits (full: ∂lm_head too; LoRA: the
    adapters of every decoder layer, the head frozen)."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(12)
    model = tiny_model(3, torch.float64)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():  # non-zero B, so the adapters change the function
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    batch = method_batch(g, model, method)
    results = []
    for fused in (False, True):
        fastunlearn.patch(model, fused=fused, backend="torch")
        assert fastunlearn.models.patching.is_fused(model) == fused
        loss, parts = method_loss(model, batch, method, npo_beta=0.37)
        loss.backward()
        results.append((loss.detach(), parts, grads(model)))
    (loss0, parts0, grads0), (loss1, parts1, grads1) = results
    assert loss1.dtype == torch.float64 and parts1.keys() == parts0.keys()
    assert_close(loss1, loss0, 1e-11)
    for key in parts0:
        assert_close(parts1[key], parts0[key], 1e-11)
    assert len(grads1) == len(grads0) and any(w.abs().max() > 0 for w in grads0)
    for a, b in zip(grads1, grads0, strict=True):
        assert_close(a, b, 1e-11, 1e-11 * float(b.abs().max()))


def test_npo_at_the_reference_is_two_log_two_over_beta():
    """The reference is the policy term computed by the same call, so before any step the log-ratio
    is 0 and the loss ``(2/β)·log 2``, whichever path computes it."""
    g = torch.Generator().manual_seed(2)
    for fused in (True, False):
        model = tiny_model(1)
        forget = random_batch(g, [6, 6], prompt=2)
        fastunlearn.patch(model, fused=fused)
        forget["ref_logp"] = sequence_logprobs(model, [forget])
        policy = model(
            **{k: forget[k] for k in ("input_ids", "attention_mask", "labels")}, loss_type="seq_logprob"
        )
        loss = npo_loss(policy.loss, forget["ref_logp"], 0.1)
        torch.testing.assert_close(loss, torch.tensor(2 / 0.1 * math.log(2)), rtol=1e-6, atol=0)


def test_sequence_logprobs_is_per_example_and_restores_mode():
    g = torch.Generator().manual_seed(5)
    model = tiny_model(2)
    model.train()
    b1, b2 = random_batch(g, [7, 3], prompt=1), random_batch(g, [5], prompt=2)
    with pytest.raises(ValueError, match=r"fastunlearn\.patch\(model\)"):
        sequence_logprobs(model, [b1])
    fastunlearn.patch(model)
    out = sequence_logprobs(model, [b1, b2])
    assert model.training and out.shape == (3,) and out.dtype == torch.float32 and not out.requires_grad
    with torch.no_grad():
        want = torch.cat([ref_seq_logp(model, b1), ref_seq_logp(model, b2)])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        sequence_logprobs(model, [])


def test_method_loss_bad_inputs():
    g = torch.Generator().manual_seed(0)
    model = tiny_model()
    forget = random_batch(g, [4], prompt=1)
    with pytest.raises(ValueError, match=r"fastunlearn\.patch\(model\)"):
        method_loss(model, {"forget": forget}, "ga")
    fastunlearn.patch(model)
    with pytest.raises(ValueError, match="unknown method 'kl'"):
        method_loss(model, {"forget": forget}, "kl")
    with pytest.raises(ValueError, match="'gd' needs a retain set"):
        method_loss(model, {"forget": forget}, "gd")
    with pytest.raises(ValueError, match="ref_logp"):
        method_loss(model, {"forget": forget, "retain": forget}, "npo")
