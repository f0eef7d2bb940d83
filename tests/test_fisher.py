"""``estimate_fisher`` against autograd run the slow way, on a tiny random Llama in fp64.

Oracles:
- per-example: one forward/backward per example *alone*, its weight gradient squared, averaged over
  the examples that carry a label;
- batch: the paper's code — Hugging Face's mean loss per batch, ``c_b·grad²`` summed, divided by
  ``Σ c_b``;
- token: output gradients kept with ``retain_grad`` and inputs by a hook, ``einsum`` of their squares.

Tolerances (``u = 2⁻²⁴``):
- fp64 model, PyTorch path: the estimate is accumulated and returned in fp32 from fp64 products,
  and every summand is non-negative, so each element is within ``(k + 2)·u`` of the oracle for ``k``
  summands: rtol 1e-6 (≈ 16u) covers ``k ≤ 14``. The fp64 gradients themselves (a batch against one
  example at a time: other summation orders) agree to ``c·u₆₄`` of the layer's largest gradient, which
  moves a square ``g²`` by ``≤ 2c·u₆₄`` of the largest square: atol 1e-12 of the layer's largest entry
  (``c`` up to ~4500) keeps elements whose gradients nearly cancel from failing on rounding.
- fp32 model, Triton path, against the fp64 PyTorch path: see :func:`assert_fp32_estimate`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.fisher import VOCAB, fisher_llama, linear_weights, make_batch, per_example_oracle

from fastunlearn.fisher import FisherEstimate, estimate_fisher
from fastunlearn.models.naming import canonical_name


@pytest.fixture(scope="module")
def model():
    return fisher_llama()


@pytest.fixture(scope="module")
def batches():
    # Row 2 of the second batch has labels only in its prompt part: no label token at all.
    second = make_batch(3, 9, seed=2, pad_rows=[(0, 6)])
    second["labels"][2] = -100
    return [make_batch(4, 12, seed=1, pad_rows=[(1, 8), (3, 5)]), second]


def batch_oracle(model, batches, names):
    """The paper's measure_importance.py: the token-mean loss of each batch (what ``model(**batch).loss``
    computes, written out here because Hugging Face upcasts it to fp32 only), ``cnt·grad²`` summed,
    divided by ``Σ cnt``."""
    weights = linear_weights(model, names)
    sums = {n: torch.zeros_like(w) for n, w in weights.items()}
    total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
        grads = torch.autograd.grad(loss, list(weights.values()))
        cnt = int((batch["labels"][:, 1:] != -100).sum())
        for name, grad in zip(weights, grads):
            sums[name] += grad.square() * cnt
        total += cnt
    return {n: s / total for n, s in sums.items()}


def token_oracle(model, batches, name, count):
    layer = dict(model.named_modules())[name]
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["x"], captured["y"] = args[0], output

    handle = layer.register_forward_hook(hook)
    total = 0
    try:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                batch["labels"][:, 1:].flatten(),
                ignore_index=-100,
                reduction="sum",
            )
            loss.backward()
            g, x = captured["y"].grad, captured["x"]
            total = total + torch.einsum("bto,bti->oi", g.square(), x.square())
            model.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    return total / count


def assert_estimate(got, want, rtol=1e-6):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float32
        scale = want[name].abs().max().item()
        torch.testing.assert_close(
            got[name].double(), want[name].double(), rtol=rtol, atol=1e-12 * scale, msg=name
        )


U32 = 2.0**-24


def assert_fp32_estimate(got, want, num_examples):
    """An fp32 model's estimate ``F̂`` against the fp64 one ``F = (1/N)·Σ_n g_n²``, element by element.

    The fp32 forward and backward give each per-example gradient an error ``|δ_n| ≤ δ = c·u·G``,
    relative to the layer's largest gradient ``G ≤ √(N·max F)`` (an error relative to the layer's scale,
    not to each element: it comes from the activations and output gradients, each the result of a few
    dozen fp32 reductions of ≤ 48 terms; ``c = 100``). Then, by Cauchy–Schwarz,
    ``|F̂ − F| ≤ (1/N)·Σ_n (2|g_n|·δ + δ²) ≤ 2δ·√F + δ²``, plus the fp32 accumulation (rtol 1e-6, as in
    :func:`assert_estimate`). The error of a small entry is ∝ ``√F``, not ∝ ``F``: a relative
    tolerance alone would fail on entries whose gradients nearly cancel.
    """
    for name in want:
        F = want[name].double()
        delta = 100 * U32 * math.sqrt(num_examples * F.max().item())
        bound = 2 * delta * F.sqrt() + delta**2 + 1e-6 * F
        worst = ((got[name].double() - F).abs() / bound).max().item()
        assert worst <= 1, f"{name}: error {worst:.2f}× the fp32 bound"


LINEAR_SUFFIXES = [f"self_attn.{s}_proj" for s in "qkvo"] + [f"mlp.{s}_proj" for s in ("gate", "up", "down")]


def all_linear(n_layers=2):
    return [f"model.layers.{i}.{s}" for i in range(n_layers) for s in LINEAR_SUFFIXES]


def test_per_example_matches_autograd_loop(model, batches):
    est = estimate_fisher(model, batches, backend="torch", progress=False)
    want, count = per_example_oracle(model, batches, all_linear())
    assert set(est) == set(all_linear())  # every nn.Linear but lm_head
    assert est.mode == "per_example" and est.num_examples == count == 6
    assert est.num_tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert_estimate(est, want)


def test_triton_backend_matches_torch(model, batches):
    model32 = fisher_llama(torch.float32)
    model32.load_state_dict(model.state_dict())
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    reference = estimate_fisher(model, batches, target_modules=names, backend="torch", progress=False)
    got = estimate_fisher(model32, batches, target_modules=names, backend="triton", progress=False)
    assert set(got) == set(names) and all(got[n].dtype == torch.float32 for n in names)
    assert_fp32_estimate(got, reference, reference.num_examples)


def test_batch_mode_is_the_papers_estimator(model, batches):
    est = estimate_fisher(model, batches, mode="batch", backend="torch", progress=False)
    assert est.mode == "batch"
    assert_estimate(est, batch_oracle(model, batches, all_linear()))


def test_token_mode(model, batches):
    name = "model.layers.1.self_attn.v_proj"
    est = estimate_fisher(
        model, batches, target_modules=[name], mode="token", backend="torch", progress=False
    )
    assert_estimate(est, {name: token_oracle(model, batches, name, est.num_examples)})


def test_target_modules(model, batches):
    one = batches[:1]
    est = estimate_fisher(model, one, target_modules=["q_proj", "v_proj"], progress=False)
    assert sorted(est) == sorted(n for n in all_linear() if n.endswith(("q_proj", "v_proj")))
    # A full name, a peft-style name, a dotted suffix and the output embedding when asked for.
    names = [
        "model.layers.0.mlp.up_proj",
        "base_model.model.model.layers.1.mlp.gate_proj.base_layer",
        "1.self_attn.o_proj",
        "lm_head",
    ]
    est = estimate_fisher(model, one, target_modules=names, progress=False)
    assert sorted(est) == sorted(
        [
            "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.gate_proj",
            "model.layers.1.self_attn.o_proj",
            "lm_head",
        ]
    )
    assert est["lm_head"].shape == (VOCAB, 32)
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer.*q_proj"):
        estimate_fisher(model, one, target_modules=["qproj"], progress=False)


def snapshot(model):
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
    }


def assert_same_state(model, before):
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    for name, (value, flag, grad) in before["params"].items():
        new_value, new_flag, new_grad = after["params"][name]
        assert torch.equal(new_value, value) and new_flag == flag and new_grad is grad, name


def test_model_left_unchanged(batches):
    model = fisher_llama(seed=1)
    model.train()
    model.model.layers[0].eval()  # a mix of modes must come back as it was
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    before = snapshot(model)
    estimate_fisher(model, batches, backend="torch", progress=False)
    assert_same_state(model, before)

    def failing():
        yield batches[0]
        yield {"input_ids": batches[0]["input_ids"]}  # no labels: raises after one backward

    with pytest.raises(ValueError, match="batch 1 has no 'labels'"):
        estimate_fisher(model, failing(), backend="torch", progress=False)
    assert_same_state(model, before)


def test_peft_wrapped_model_measures_the_base_weights(model, batches):
    import copy

    from peft import LoraConfig, get_peft_model

    plain = estimate_fisher(model, batches, backend="torch", progress=False)
    wrapped = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    )
    before = snapshot(wrapped)
    est = estimate_fisher(wrapped, batches, backend="torch", progress=False)
    assert_same_state(wrapped, before)  # LoRA parameters still trainable, no .grad
    assert any(flag for _, flag, _ in before["params"].values())
    # LoRA's B starts at zero: the wrapped model computes the same function, so the same Fisher.
    assert_estimate(est, plain.to("cpu"))
    est_q = estimate_fisher(wrapped, batches[:1], target_modules=["self_attn.q_proj"], progress=False)
    assert sorted(est_q) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_save_and_load(tmp_path, model, batches):
    est = estimate_fisher(model, batches[:1], target_modules=["v_proj"], progress=False)
    path = tmp_path / "fisher.safetensors"
    est.save(path)
    loaded = FisherEstimate.load(path)
    assert (loaded.mode, loaded.num_examples, loaded.num_tokens) == (
        est.mode,
        est.num_examples,
        est.num_tokens,
    )
    assert set(loaded) == set(est)
    for name in est:
        assert torch.equal(loaded[name], est[name])
    assert torch.equal(
        loaded["base_model.model.model.layers.0.self_attn.v_proj.base_layer.weight"], est[all_linear()[2]]
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        est.save(path)
    est.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["fisher.safetensors"]  # no temporary left behind

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a fastunlearn Fisher estimate"):
        FisherEstimate.load(tmp_path / "other.safetensors")


def test_bad_batches(model, batches):
    with pytest.raises(ValueError, match="has no 'labels'"):
        estimate_fisher(model, [{"input_ids": batches[0]["input_ids"]}], progress=False)
    ignored = dict(batches[0], labels=torch.full_like(batches[0]["labels"], -100))
    with pytest.raises(ValueError, match="every label in the batches is -100"):
        estimate_fisher(model, [ignored], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        estimate_fisher(model, [], progress=False)
    with pytest.raises(ValueError, match="must both be \\[batch, tokens\\]"):
        estimate_fisher(model, [dict(batches[0], labels=batches[0]["labels"][:, :-1])], progress=False)
    with pytest.raises(ValueError, match="unknown Fisher mode"):
        estimate_fisher(model, batches, mode="sample", progress=False)


def test_non_finite_fisher_is_an_error(batches):
    model = fisher_llama(seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        estimate_fisher(model, batches, progress=False)


def test_canonical_name():
    assert canonical_name("module.base_model.model.model.layers.3.mlp.up_proj.base_layer.weight") == (
        "model.layers.3.mlp.up_proj"
    )
    assert canonical_name("model.layers.3.mlp.up_proj") == "model.layers.3.mlp.up_proj"
