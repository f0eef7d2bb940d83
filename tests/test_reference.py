"""The reference model without a second copy equals a true copy of the model before unlearning.

LoRA: the model with its adapters switched off; FILA: the residual base with the initial adapter
``s·B₀A₀`` in place of the trained one; full fine-tuning: a frozen copy. Each is compared with a copy
of the model taken before wrapping, after the trained weights have moved (as after some steps): the
last hidden states (the output head's input, the KL term's reference) and two decoder layers' outputs
(RMU's), read from the copy by ``transformers`` itself (``last_hidden_state``, ``hidden_states``).
"""

import copy

import pytest
import torch
from helpers.models import tiny_llama
from helpers.oracles import assert_close
from peft import LoraConfig, get_peft_model

import fastunlearn
from fastunlearn.fisher.fila import fila_init, lora_layers
from fastunlearn.methods.objectives import build_reference, forward_capturing
from fastunlearn.models.devices import eval_mode

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61


def batch(g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trained(init: str, g: torch.Generator):
    """A 3-layer tiny Llama initialised with ``init`` and patched, a true copy of it before, and the
    package's reference of it."""
    base = tiny_llama(V, num_hidden_layers=3)
    original = copy.deepcopy(base).eval()
    model = (
        base
        if init == "full"
        else get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    )
    if init == "fila":
        weights = {
            name: torch.rand(layer.out_features, generator=g) + 0.1
            for name, (_, layer) in lora_layers(model).items()
        }
        fila_init(model, row_weights=weights)
    fastunlearn.patch(model, backend="torch")
    return model, original, build_reference(model, init)


def policy_hidden(model, part) -> torch.Tensor:
    with eval_mode(model):
        return forward_capturing(
            model, fastunlearn.models.patching.find_causal_lm(model).lm_head, part, inputs=True
        )


@pytest.mark.parametrize("init", ["lora", "fila", "full"])
def test_reference_equals_a_true_copy(init):
    g = torch.Generator().manual_seed(4)
    model, original, reference = trained(init, g)
    part = batch(g)
    # Before any step the reference is the policy itself, to the bit: the same module calls.
    assert torch.equal(reference.hidden(part), policy_hidden(model, part))

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():  # training moves what trains
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with torch.no_grad():
        ids, mask = part["input_ids"], part["attention_mask"]
        want = original(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = original.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = {
        "last": reference.hidden(part),
        0: reference.activations(part, 0),
        1: reference.activations(part, 1),
    }
    expected = {"last": last, 0: want.hidden_states[1], 1: want.hidden_states[2]}
    for key, value in expected.items():
        # LoRA and full fine-tuning run the original weights: the same fp32 operations. FILA adds s·B₀A₀x
        # to W_res·x, each rounded to fp32 (2⁻²⁴ of the terms' magnitudes, sums of 32-64 products) where
        # the copy computes W·x: through 3 layers and their norms, below 1e-5 of the largest activation.
        assert_close(got[key], value, 0, 1e-5 * float(value.abs().max()))
    # The trained model has moved away from it (the comparison can fail), and is left as it was.
    assert float((policy_hidden(model, part) - last).abs().max()) > 1e-3 * float(last.abs().max())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.training and all(
        "forward" not in layer.__dict__ for _, (_, layer) in lora_layers(model).items()
    )
    if init == "full":
        assert reference.module is not model and not any(
            p.requires_grad for p in reference.module.parameters()
        )


def test_a_reference_without_its_adapters_is_refused():
    with pytest.raises(ValueError, match="needs a peft model with LoRA layers"):
        build_reference(tiny_llama(V), "lora")
    model = get_peft_model(tiny_llama(V), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with pytest.raises(ValueError, match="fila_init's record"):
        build_reference(model, "fila")
