"""Unlearning objectives against plain fp64 references: loss values and parameter gradients, every preset.

The objectives are computed by the patched model (``fastunlearn.patch``), fused (from the last hidden
states) or on the logits path (``fused=False``, the oracle the fused path is held to). The model is
wrapped with LoRA whose ``B`` is non-zero (as after some training), so the policy differs from the
reference: the package's reference is the same model with its adapters switched off
(:mod:`fastunlearn.methods.objectives`), the oracle's a true copy taken before wrapping. Two checks:

- the fused path against the objective written out on fp64 logits (:mod:`helpers.methods`), on an fp32
  model: the loss to fp32 rounding of the row statistics (rtol 1e-5), the parameter gradients to fp32
  rounding through the model's backward (rtol 1e-4 plus 1e-6 absolute, for entries formed by
  cancellation);
- the logits path against the fused path on an fp64 model, where both compute the same sums in different
  orders (the chunked ``G·W`` and ``Gᵀh`` against autograd through the logits): each entry is a sum
  of at most a few thousand fp64 products (V·B·T), off by at most that many units of fp64 rounding
  (2⁻⁵³ ≈ 1.1e-16) of its terms' magnitudes, so 1e-11 of the tensor's largest entry (a bound with a
  margin of ~10x for the few layers the error passes through) — a missing term or wrong scale is off
  by O(1).
"""

import copy
import math

import pytest
import torch
from helpers.methods import ref_objective, ref_seq_logp
from helpers.models import tiny_llama
from helpers.oracles import assert_close
from peft import LoraConfig, get_peft_model

import fastunlearn
from fastunlearn.methods import METHODS, PRESETS, resolve_method
from fastunlearn.methods.objectives import Objective, build_reference, sequence_logprobs
from fastunlearn.methods.rmu import RmuSetting
from fastunlearn.models import patching

pytestmark = pytest.mark.usefixtures("one_thread")

V = 53  # odd vocabulary
BETA = 0.37


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


def setup(method: str, dtype: torch.dtype = torch.float32, seed: int = 0, **terms):
    """A LoRA-wrapped tiny Llama with non-zero ``B``, a true copy of its base, the resolved preset
    (with non-default γ, α, β, δ so that every weight is exercised), its objective and a batch."""
    g = torch.Generator().manual_seed(11 + seed)
    base = tiny_llama(V, seed=seed, dtype=dtype)
    copy_ = copy.deepcopy(base).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # as after training: the adapters change the function
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=g)
    preset = PRESETS[method]
    spec = resolve_method(
        method, forget_weight=0.8 * preset.forget_weight, retain_weight=1.3 * preset.retain_weight,
        beta=BETA, delta=0.25, **terms,
    )  # fmt: skip
    rmu = RmuSetting(layer=1, steering=6.5, hidden_size=32, seed=3) if spec.uses_rmu else None
    objective = Objective(spec, build_reference(model, "lora") if spec.step_reference else None, rmu)
    batch = {
        "forget": random_batch(g, [9, 6, 8], prompt=3),
        "retain": random_batch(g, [5, 7, 7, 4], prompt=2),
        "idk": random_batch(g, [7, 9, 5], prompt=3),
    }
    if not spec.needs_retain:
        del batch["retain"]
    if not spec.uses_refusals:
        del batch["idk"]
    with torch.no_grad():  # references that differ from the current model, so the log-ratios are not 0
        for part, shift in (("forget", [0.5, -1.25, 2.0]), ("idk", [-0.75, 1.5, 0.25])):
            if part in batch:
                batch[part]["ref_logp"] = ref_seq_logp(copy_, batch[part]).to(dtype) + torch.tensor(shift)
    return model, copy_, spec, objective, batch


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out


# Every preset, and pairs no preset makes: the targets-only KL, IdK not pooled, a retain term under RMU.
PAIRS = [(m, {}) for m in METHODS] + [
    ("ga", {"retain_term": "kl_targets"}), ("idk", {"retain_term": "kl"}), ("npo", {"retain_term": "rmu"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "terms"), PAIRS, ids=[m + "".join(f"-{v}" for v in t.values()) for m, t in PAIRS]
)
def test_objective_matches_fp64_reference(method, terms):
    """The fused path (the default) against the formula; the logits path is held to it below."""
    model, copy_, spec, objective, batch = setup(method, **terms)
    fastunlearn.patch(model, backend="torch")

    loss, parts = objective(model, batch)
    loss.backward()
    got = grads(model)
    rmu = None if objective.rmu is None else (1, objective.rmu.target(torch.device("cpu")))
    expected = ref_objective(model, batch, spec, reference=copy_, rmu=rmu)
    expected.backward()
    want = grads(model)

    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    total = parts["forget_loss"] + parts.get("retain_loss", 0)
    torch.testing.assert_close(total, loss.detach())
    assert ("retain_loss" in parts) == spec.needs_retain
    for a, b in zip(got, want, strict=True):
        # fp32 forward/backward through the model against an fp64 loss head.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().max() > 0 for a in got)


@pytest.mark.parametrize("method", METHODS)
def test_fused_path_equals_the_logits_path_in_fp64(method):
    """Same objective, parts and gradients with and without the logits (the adapters of every decoder
    layer, the head frozen)."""
    model, _, _, objective, batch = setup(method, torch.float64, seed=3)
    results = []
    for fused in (False, True):
        fastunlearn.patch(model, fused=fused, backend="torch")
        assert (patching.is_patched(model) and patching.takes_fused_path(model)) == fused
        loss, parts = objective(model, batch)
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


def test_presets_are_the_published_methods():
    """The table of methods (TOFU, MUSE, open-unlearning, the papers): terms, weights and β."""
    table = {
        "ga": ("ga", "none", 1, 1), "gd": ("ga", "nll", 1, 1), "kl": ("ga", "kl", 1, 1),
        "ihl": ("ihl", "nll", 1, 1), "npo": ("npo", "none", 1, 1), "npo+gd": ("npo", "nll", 1, 1),
        "npo+kl": ("npo", "kl", 1, 1), "simnpo": ("simnpo", "nll", 0.125, 1), "idk": ("idk", "nll", 1, 1),
        "dpo": ("dpo", "nll", 1, 1), "rmu": ("rmu", "rmu", 1, 1200),
    }  # fmt: skip
    assert set(METHODS) == set(table)
    for name, terms in table.items():
        spec = resolve_method(name)
        assert (spec.forget, spec.retain, spec.forget_weight, spec.retain_weight) == terms, name
    assert [resolve_method(m).beta for m in ("npo", "dpo", "simnpo")] == [0.1, 0.1, 4.5]
    # Overrides: a term replaced keeps the other's weight; a preset's weight stays with its own term.
    spec = resolve_method("npo", retain_term="kl", beta=0.2)
    assert (spec.forget, spec.retain, spec.beta) == ("npo", "kl", 0.2)
    assert resolve_method("simnpo", forget_term="npo").forget_weight == 1.0
    assert resolve_method("rmu", retain_term="nll").retain_weight == 1.0


@pytest.mark.parametrize("method", ["npo", "dpo"])
def test_at_the_reference_npo_and_dpo_are_two_log_two_over_beta(method):
    """The fixed reference is the policy term computed by the same call, so before any step every
    log-ratio is 0 and the loss ``(2/β)·log 2``, whichever path computes it."""
    g = torch.Generator().manual_seed(2)
    for fused in (True, False):
        model = tiny_llama(V, seed=1)
        batch = {"forget": random_batch(g, [6, 6], prompt=2), "idk": random_batch(g, [5, 7], prompt=2)}
        fastunlearn.patch(model, fused=fused)
        for part in batch.values():
            part["ref_logp"] = sequence_logprobs(model, [part])
        loss, _ = Objective(resolve_method(method, retain_term="none"))(model, batch)
        torch.testing.assert_close(loss, torch.tensor(2 / 0.1 * math.log(2)), rtol=1e-6, atol=0)


def test_sequence_logprobs_is_per_example_and_restores_mode():
    g = torch.Generator().manual_seed(5)
    model = tiny_llama(V, seed=2)
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


def test_objective_bad_inputs():
    g = torch.Generator().manual_seed(0)
    model = tiny_llama(V)
    forget = random_batch(g, [4], prompt=1)
    with pytest.raises(ValueError, match=r"fastunlearn\.patch\(model\)"):
        Objective(resolve_method("ga"))(model, {"forget": forget})
    fastunlearn.patch(model)
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        Objective(resolve_method("sgd"))(model, {"forget": forget})
    with pytest.raises(ValueError, match="unknown retain_term 'l2'"):
        Objective(resolve_method("ga", retain_term="l2"))(model, {"forget": forget})
    with pytest.raises(ValueError, match="ga \\+ nll needs a retain set"):
        Objective(resolve_method("gd"))(model, {"forget": forget})
    with pytest.raises(ValueError, match="ref_logp"):
        Objective(resolve_method("npo"))(model, {"forget": forget})
    with pytest.raises(ValueError, match=r"batch\['idk'\]"):
        Objective(resolve_method("idk"))(model, {"forget": forget, "retain": forget})
    with pytest.raises(ValueError, match="'kl' retain term needs the reference model"):
        Objective(resolve_method("kl"))(model, {"forget": forget, "retain": forget})
    with pytest.raises(ValueError, match="rmu terms need"):
        Objective(resolve_method("rmu"), build_reference(model, "full"))(
            model, {"forget": forget, "retain": forget}
        )
