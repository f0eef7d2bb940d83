"""fastunlearn.patch: the unlearning losses computed in the model's own forward, against the logits path.

Reference: the same model, unpatched — its logits, the loss of those logits in fp64 (the IHL and NLL
formulas written plainly), and autograd through the model. Checked: the loss, the gradient with
respect to the last hidden states (what the patched head hands back) and every parameter gradient.

Tolerances. fp32: the paths differ only by fp32 rounding of the row statistics (the fused losses'
rtol 1e-5 against fp64) and of the chunked head products ``G·W`` (fp32 sums of V terms, at most
V·2⁻²⁴ ≈ 1e-5 relative for the V = 131 used here), which then go through the same fp32 backward
graph: rtol 1e-4 plus 1e-5 of each tensor's largest entry (for entries formed by cancellation).
bf16 autocast: both paths compute the same bf16 logits, so the loss is judged at 2⁻⁸; the gradient
of the hidden states carries a few bf16 roundings in either path (the chunk gradient, its product
with W, and for ``grad_output ∉ 2^ℤ`` one more for its scaling in the fused path): 2⁻⁷ relative plus
2⁻⁸ of the largest entry. The decoder's bf16 backward turns those last-bit differences into
element-wise noise that cancellation can make large in relative terms, so the parameter gradients
are judged in norm, at 2⁻⁵ (a wrong scale or a missing term is off by O(1)).
"""

from __future__ import annotations

import copy
from types import MethodType

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_llama
from helpers.oracles import assert_close
from references.formulations import ihl_reference
from torch import nn

import fastunlearn
from fastunlearn.models.patching import find_causal_lm, fused_blocker, is_patched, takes_fused_path

VOCAB = 131  # not a power of two
COMMON = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip
FAMILIES = {
    "llama": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 8},
    "phi": {},  # its head has a bias
    "phi3": {"num_key_value_heads": 2},
    "gpt_neox": {},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 8},
    "gpt2": {},  # tied embeddings
    "gemma": {"num_key_value_heads": 2, "head_dim": 8},
    "gemma2": {"num_key_value_heads": 2, "head_dim": 8, "final_logit_softcapping": None},
}
LOSS_TYPES = ["ihl", "nll", "seq_logprob"]


def is_fused(model) -> bool:
    """Patched, and its losses take the fused path."""
    return is_patched(model) and takes_fused_path(model)


def build(family: str, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **{**COMMON, **FAMILIES[family], **overrides})
    # eval(): no dropout, so both paths see the same function; gradients are computed all the same.
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def batch(seed: int, lengths=(11, 8, 10)):
    """Right-padded ids, mask, and labels with an ignored prompt and padding."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=gen)
    mask = torch.zeros_like(ids)
    labels = ids.clone()
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, n:] = -100
        labels[i, : 2 + i] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_type: str, ref_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of materialised logits in fp64 (labels shifted as the contract says)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    z = logits.double()
    if loss_type in ("kl", "kl_targets"):  # KL(P_ref ‖ P_θ) per position, averaged
        log_p, log_q = z.log_softmax(-1), ref_logits.double().log_softmax(-1)
        rows = (log_q.exp() * (log_q - log_p)).sum(-1)
        keep = targets != -100 if loss_type == "kl_targets" else torch.ones_like(targets, dtype=torch.bool)
        return (rows * keep).sum() / keep.sum()
    if loss_type == "ihl":
        return ihl_reference(z, targets)
    valid = targets != -100
    z_y = z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, z.logsumexp(-1) - z_y, 0.0)
    return nll.sum() / valid.sum().clamp_min(1) if loss_type == "nll" else -nll.sum(-1)


def grad_out_for(loss: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    return torch.rand(loss.shape, generator=gen) + 0.5 if loss.dim() else torch.tensor(0.7)


def step(model: nn.Module, data: dict, loss_type: str, *, patched: bool, autocast: bool = False, ref=None):
    """``(loss, ∂loss/∂hidden, {name: ∂loss/∂param})`` of one forward+backward through ``model`` on
    either path; ``hidden`` is the last hidden states, the output head's input. ``ref``: the reference
    model's ``(last hidden states, logits)`` for the KL losses."""
    captured = []

    def capture(module, args):
        if args[0].requires_grad:  # not the reference's hidden states (the KL's logits path)
            args[0].retain_grad()
            captured.append(args[0])

    hook = find_causal_lm(model).get_output_embeddings().register_forward_pre_hook(capture)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if patched:
            out = model(**data, loss_type=loss_type, **({} if ref is None else {"ref_hidden": ref[0]}))
            assert out.logits is None
            loss = out.loss
        else:
            logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
            loss = reference_loss(logits, data["labels"], loss_type, None if ref is None else ref[1])
    hook.remove()
    loss.backward(grad_out_for(loss).to(loss.dtype))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), captured[0].grad, grads


def assert_same_step(got, want, *, bf16: bool = False) -> None:
    (loss, dh, grads), (want_loss, want_dh, want_grads) = got, want
    assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
    assert grads.keys() == want_grads.keys() and grads
    if not bf16:
        assert_close(loss, want_loss, 1e-5)
        for g, w in [(dh, want_dh), *((grads[k], want_grads[k]) for k in grads)]:
            assert_close(g, w, 1e-4, 1e-5 * float(w.abs().max()))
        return
    assert_close(loss, want_loss, 2.0**-8)
    assert_close(dh, want_dh, 2.0**-7, 2.0**-8 * float(want_dh.abs().max()))
    for name, g in grads.items():
        err = float((g - want_grads[name]).norm() / want_grads[name].norm())
        assert err <= 2.0**-5, f"{name}: relative error {err:.3g} in norm"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_match_the_logits_path(family):
    model = build(family)
    data = batch(seed=1)
    assert fused_blocker(model) is None
    for loss_type in LOSS_TYPES:
        want = step(model, data, loss_type, patched=False)
        fastunlearn.patch(model, backend="torch")
        assert is_fused(model)
        assert_same_step(step(model, data, loss_type, patched=True), want)
        fastunlearn.unpatch(model)


def test_triton_backend_and_hooks_of_the_model_and_its_head_run():
    """The loss is computed by the head's own call: hooks on the model and on its head (where FSDP
    and ZeRO-3 gather and release the head's weight) run once per forward."""
    model = tiny_llama(VOCAB, seed=2)
    data = batch(seed=2)
    want = step(model, data, "ihl", patched=False)
    calls = {"model": 0, "head": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1))
    model.lm_head.register_forward_pre_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    fastunlearn.patch(model, backend="triton")
    assert_same_step(step(model, data, "ihl", patched=True), want)
    assert calls == {"model": 1, "head": 1}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_autocast_with_fp32_weights(loss_type):
    model = tiny_llama(VOCAB, seed=3)
    data = batch(seed=3)
    want = step(model, data, loss_type, patched=False, autocast=True)
    fastunlearn.patch(model)
    assert_same_step(step(model, data, loss_type, patched=True, autocast=True), want, bf16=True)


@pytest.mark.parametrize("order", ["patch_first", "wrap_first"])
def test_accelerate_mixed_precision_wrapping(order):
    """accelerate's prepare() replaces ``model.forward`` with autocast + fp32 output conversion
    (the code of Accelerator.prepare_model, with its context); either order computes the loss
    under the autocast, and the loss stays what it is (fp32, no logits to convert)."""
    from accelerate.utils import convert_outputs_to_fp32

    def accelerate_prepare(model):
        model.forward = MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__), model)
        model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)

    model = tiny_llama(VOCAB, seed=4)
    data = batch(seed=4)
    want = step(model, data, "nll", patched=False, autocast=True)
    if order == "patch_first":
        fastunlearn.patch(model)
        accelerate_prepare(model)
    else:
        accelerate_prepare(model)
        wrapped = model.forward
        fastunlearn.patch(model)
    assert_same_step(step(model, data, "nll", patched=True), want, bf16=True)
    fastunlearn.unpatch(model)
    if order == "wrap_first":
        assert model.__dict__["forward"] is wrapped  # accelerate's wrapper is back in place
    else:  # accelerate's wrapper stays, around what is now a pass-through
        with pytest.raises(ValueError, match="unpatched"):
            model(**data, loss_type="nll")
    assert model(input_ids=data["input_ids"]).logits.dtype == torch.float32


@pytest.mark.parametrize("head", ["frozen", "modules_to_save"])
def test_peft_lora(head):
    """The decoder's LoRA layers are the ones used; the head is plain (frozen) or peft's trained copy."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(VOCAB, seed=5)
    extra = {"modules_to_save": ["lm_head"]} if head == "modules_to_save" else {}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **extra))
    for name, p in peft_model.named_parameters():  # non-zero B, so the adapters change the function
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    data = batch(seed=5)
    for loss_type in LOSS_TYPES:
        want = step(peft_model, data, loss_type, patched=False)
        fastunlearn.patch(peft_model)
        assert find_causal_lm(peft_model) is model and is_fused(peft_model)
        got = step(peft_model, data, loss_type, patched=True)
        assert any("lora_B" in name for name in got[2])
        assert any("modules_to_save" in name for name in got[2]) == (head == "modules_to_save")
        assert_same_step(got, want)
        fastunlearn.unpatch(peft_model)


def test_lora_on_the_head_takes_the_logits_path():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(VOCAB, seed=6)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    data = batch(seed=6)
    want = step(peft_model, data, "ihl", patched=False)
    with pytest.raises(ValueError, match=r"not a plain nn\.Linear"):
        fastunlearn.patch(peft_model, fused=True)
    with pytest.warns(UserWarning, match=r"logits path.*not a plain nn\.Linear"):
        fastunlearn.patch(peft_model)
    assert not is_fused(peft_model)
    assert_same_step(step(peft_model, data, "ihl", patched=True), want)


def _ddp_steps(when: str):
    """The unpatched DDP step and the patched one (patched ``when``), in a function of their own so
    that the wrappers, which hold the process group, are gone before the group is left."""
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_llama(VOCAB, seed=7)
    data = batch(seed=7)
    want = step(DistributedDataParallel(copy.deepcopy(model)), data, "ihl", patched=False)
    if when == "before_wrapping":
        fastunlearn.patch(model)
    ddp = DistributedDataParallel(model)
    if when == "after_wrapping":
        fastunlearn.patch(ddp)
    assert find_causal_lm(ddp) is model and is_fused(ddp)
    return step(ddp, data, "ihl", patched=True), want


@pytest.mark.parametrize("when", ["before_wrapping", "after_wrapping"])
def test_ddp(when, tmp_path):
    from fastunlearn.engines import distributed

    # A file store: a TCP port found free here can be taken by another process before the group binds it.
    distributed.join_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        got, want = _ddp_steps(when)
    finally:
        distributed.leave_group()
    assert_same_step(got, want)


def test_unpatch_restores_exactly_and_plain_calls_are_unchanged():
    model = tiny_llama(VOCAB, seed=8)
    data = batch(seed=8)
    before = dict(model.__dict__)
    plain = model(**data)  # Hugging Face's own loss and logits
    fastunlearn.patch(model)
    fastunlearn.patch(model, chunk_rows=3)  # re-patching replaces the options, wraps nothing twice
    same = model(**data)
    assert torch.equal(same.logits, plain.logits) and torch.equal(same.loss, plain.loss)
    fastunlearn.unpatch(model)
    assert not is_patched(model)
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is v for k, v in before.items())
    assert torch.equal(model(**data).logits, plain.logits)


def test_soft_capped_gemma2_warns_and_takes_the_logits_path():
    model = build("gemma2", final_logit_softcapping=3.0)
    data = batch(seed=9)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fastunlearn.patch(model, fused=True)
    want = {t: step(model, data, t, patched=False) for t in LOSS_TYPES}
    with pytest.warns(UserWarning, match="final_logit_softcapping") as record:
        fastunlearn.patch(model)
        for t in LOSS_TYPES:
            assert_same_step(step(model, data, t, patched=True), want[t])
    assert len(record) == 1  # one warning, not one per step
    assert not is_fused(model)


def test_fused_false_takes_the_logits_path():
    model = build("gpt_neox", seed=10)
    data = batch(seed=10)
    want = step(model, data, "seq_logprob", patched=False)
    fastunlearn.patch(model, fused=False)
    assert is_patched(model) and not is_fused(model)
    assert_same_step(step(model, data, "seq_logprob", patched=True), want)


@pytest.mark.parametrize("fused", [True, False])
def test_all_ignored_batch_gives_zero_loss_and_gradient(fused):
    model = build("gpt2", seed=11)
    data = batch(seed=11)
    data["labels"] = torch.full_like(data["labels"], -100)
    fastunlearn.patch(model, fused=fused)
    for loss_type in LOSS_TYPES:
        loss, dh, grads = step(model, data, loss_type, patched=True)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in [dh, *grads.values()])


def test_return_dict_false_and_bad_calls():
    model = tiny_llama(VOCAB, seed=12)
    data = batch(seed=12)
    fastunlearn.patch(model)
    (loss,) = model(**data, loss_type="nll", return_dict=False)
    assert_close(loss, model(**data, loss_type="nll").loss, 0.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        model(**data, loss_type="npo")
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=data["input_ids"], loss_type="ihl")
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**data, loss_type="ihl", logits_to_keep=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(**{**data, "labels": data["labels"].clamp_min(0) + VOCAB}, loss_type="ihl")
    with pytest.raises(TypeError, match="no causal language model"):
        fastunlearn.patch(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="backend"):
        fastunlearn.patch(model, backend="cuda")
    with pytest.raises(ValueError, match="fused must be"):
        fastunlearn.patch(model, fused="yes")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_model_losses_come_from_its_bf16_hidden_states_uncopied(loss_type, monkeypatch):
    """bf16 end to end: the fused loss gets the very bf16 tensor the head was called with (no fp32 or
    contiguous copy), no ``[B, T, V]`` tensor of any dtype is made forward or backward (chunks of 8
    rows), and the loss is the fp64 loss of the head's bf16 logits to their rounding: each fused logit
    is the same bf16-rounded product as the head's (half an ulp, 2⁻⁹ of |z|, apart at most when the two
    matmuls sum in different orders), which moves an IHL or NLL row by at most twice that (2⁻⁸·max|z|),
    and the seq_logprob sum by that times the row count."""
    from helpers.allocations import RecordOutputs

    from fastunlearn.models import patching

    model = tiny_llama(VOCAB, seed=13, dtype=torch.bfloat16)
    data = batch(seed=13, lengths=(20, 17, 19))
    B, T = data["labels"].shape
    head_inputs, loss_inputs = [], []
    model.lm_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    for name in ("fused_linear_ihl_loss", "fused_linear_nll_loss"):
        original = getattr(patching, name)

        def spy(hidden, *args, _original=original, **kwargs):
            loss_inputs.append(hidden)
            return _original(hidden, *args, **kwargs)

        monkeypatch.setattr(patching, name, spy)
    fastunlearn.patch(model, chunk_rows=8)
    with RecordOutputs() as rec:
        out = model(**data, loss_type=loss_type)
        out.loss.sum().backward()
    assert len(loss_inputs) == 1 and loss_inputs[0] is head_inputs[0]
    assert loss_inputs[0].dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert max(n for _, _, n in rec.outputs) < B * T * VOCAB  # no logits (nor a copy of them)
    # No fp32 product of the size of a chunk of hidden states (8 x 32) or more: nothing was upcast.
    # (A rotary table, T x head_dim/2 = 80 entries, may be an fp32 product, depending on the version.)
    assert not [(op, n) for op, d, n in rec.outputs if d == torch.float32 and "mm" in op and n >= 8 * 32]

    fastunlearn.unpatch(model)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert logits.dtype == torch.bfloat16
    want = reference_loss(logits, data["labels"], loss_type)
    row_bound = 2.0**-8 * float(logits.abs().max())
    if loss_type == "seq_logprob":  # a sum of up to T rows
        row_bound *= int((data["labels"][:, 1:] != -100).sum(-1).max())
    assert_close(out.loss.detach(), want, 0.0, row_bound)


def test_backend_is_checked_where_the_loss_runs(monkeypatch):
    """patch() checks the backend's name only: a model patched for Triton on the CPU (before being moved
    to its GPU) is accepted, and a call where the backend cannot run fails then, with the reason."""
    model = tiny_llama(VOCAB, seed=14)
    data = batch(seed=14)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine: no interpreter for CPU tensors
    fastunlearn.patch(model, backend="triton")
    with pytest.raises(ValueError, match="Triton interpreter"):
        model(**data, loss_type="ihl")
    with pytest.raises(ValueError, match=r"unknown backend 'reference'"):
        fastunlearn.patch(model, backend="reference")


def reference_model(model: nn.Module, data: dict, seed: int):
    """The reference of the KL losses: ``model`` with its decoder perturbed (as before training), the
    output head shared; its last hidden states (the head's input) and its logits."""
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lm_head" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    captured = []
    hook = ref.lm_head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        logits = ref(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    hook.remove()
    return captured[0], logits


@pytest.mark.parametrize("loss_type", ["kl", "kl_targets"])
@pytest.mark.parametrize("fused", [None, False])
def test_kl_matches_the_logits(loss_type, fused):
    """``KL(P_ref ‖ P_θ)`` over every position (``kl``) or the target positions (``kl_targets``), from
    the reference's hidden states: the fused head (fused_linear_kl_loss) and the logits path (kl_loss of
    head(ref_hidden)) against fp64 log-softmaxes of both models' logits; tolerances as above."""
    model = tiny_llama(VOCAB, seed=13)
    data = batch(seed=13)
    ref = reference_model(model, data, seed=13)
    want = step(model, data, loss_type, patched=False, ref=ref)
    fastunlearn.patch(model, fused=fused)
    assert is_fused(model) == (fused is None)
    assert_same_step(step(model, data, loss_type, patched=True, ref=ref), want)


def test_kl_arguments_are_checked():
    model = fastunlearn.patch(tiny_llama(VOCAB, seed=14), fused=False)
    data = batch(seed=14)
    ref_hidden, _ = reference_model(model, data, seed=14)
    with pytest.raises(ValueError, match="needs ref_hidden"):
        model(**data, loss_type="kl")
    with pytest.raises(ValueError, match="needs ref_hidden"):
        model(**data, loss_type="kl", ref_hidden=ref_hidden[:, 1:])
    with pytest.raises(ValueError, match="ref_hidden is for loss_type"):
        model(**data, loss_type="ihl", ref_hidden=ref_hidden)
    capped = build("gemma2", final_logit_softcapping=3.0)
    with pytest.warns(UserWarning, match="logits path"):
        fastunlearn.patch(capped)
    ref_hidden = torch.zeros(*data["input_ids"].shape, COMMON["hidden_size"])
    with pytest.raises(ValueError, match="transforms its logits after the head"):
        capped(**data, loss_type="kl", ref_hidden=ref_hidden)
