"""Unlearning objectives against plain fp64 references: loss values and parameter gradients."""

import math

import pytest
import torch
from helpers.methods import ref_objective, ref_seq_logp
from helpers.models import tiny_llama
from transformers import LlamaForCausalLM

from fastunlearn.training.methods import METHODS, method_loss, npo_loss, sequence_logprob, sequence_logprobs

V = 53  # odd vocabulary


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(V, seed=seed)


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


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_method_loss_and_gradients_match_fp64_reference(method):
    g = torch.Generator().manual_seed(11)
    model = tiny_model()
    batch = {
        "forget": random_batch(g, [9, 6, 8], prompt=3),
        "retain": random_batch(g, [5, 7, 7, 4], prompt=2),
    }
    if method == "ga":
        del batch["retain"]
    beta = 0.37
    # A reference that differs from the current model, so the NPO ratio is not 1.
    batch["forget"]["ref_logp"] = ref_seq_logp(model, batch["forget"]).detach().float() + torch.tensor(
        [0.5, -1.25, 2.0]
    )

    loss, parts = method_loss(model, batch, method, npo_beta=beta, ihl_backend="torch")
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


def test_npo_at_the_reference_is_two_log_two_over_beta():
    g = torch.Generator().manual_seed(2)
    model = tiny_model(1)
    forget = random_batch(g, [6, 6], prompt=2)
    forget["ref_logp"] = sequence_logprobs(model, [forget])
    loss = npo_loss(
        sequence_logprob(
            model(**{k: forget[k] for k in ("input_ids", "attention_mask")}).logits, forget["labels"]
        ),
        forget["ref_logp"],
        0.1,
    )
    torch.testing.assert_close(loss, torch.tensor(2 / 0.1 * math.log(2)), rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_is_per_example_and_restores_mode():
    g = torch.Generator().manual_seed(5)
    model = tiny_model(2)
    model.train()
    b1, b2 = random_batch(g, [7, 3], prompt=1), random_batch(g, [5], prompt=2)
    out = sequence_logprobs(model, [b1, b2])
    assert model.training and out.shape == (3,)
    with torch.no_grad():
        want = torch.cat([ref_seq_logp(model, b1), ref_seq_logp(model, b2)])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_method_loss_bad_inputs():
    g = torch.Generator().manual_seed(0)
    model = tiny_model()
    forget = random_batch(g, [4], prompt=1)
    with pytest.raises(ValueError, match="unknown method 'kl'"):
        method_loss(model, {"forget": forget}, "kl")
    with pytest.raises(ValueError, match="'gd' needs a retain set"):
        method_loss(model, {"forget": forget}, "gd")
    with pytest.raises(ValueError, match="ref_logp"):
        method_loss(model, {"forget": forget, "retain": forget}, "npo")


@pytest.mark.parametrize("wrap", ["full", "lora"])
def test_fused_linear_ihl_matches_the_logits_path(wrap):
    """Same objective and gradients with the forget logits never materialised (full: ∂lm_head too)."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(12)
    batch = {"forget": random_batch(g, [9, 6, 8], prompt=3), "retain": random_batch(g, [5, 7, 4], prompt=2)}
    model = tiny_model(3)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():  # non-zero B, so the adapters change the function
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    results = []
    for fused in (False, True):
        loss, parts = method_loss(model, batch, "ihl", ihl_backend="torch", fused_linear=fused)
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), parts["forget_loss"], [p.grad.clone() for p in trainable]))
        model.zero_grad(set_to_none=True)
    (loss0, forget0, grads0), (loss1, forget1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    torch.testing.assert_close(forget1, forget0, rtol=1e-6, atol=0)
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_linear_refuses_transformed_logits():
    model = tiny_model()
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are not lm_head(hidden)
    g = torch.Generator().manual_seed(13)
    batch = {"forget": random_batch(g, [6, 5], prompt=2), "retain": random_batch(g, [6, 5], prompt=2)}
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        method_loss(model, batch, "ihl", fused_linear=True)
