"""4-bit (NF4, double quantisation; QLoRA) and 8-bit bases with LoRA and FILA, on the CPU.

FILA on a quantised base never rewrites a weight: the Fisher passes run through the quantised layers,
the SVD takes each dequantised weight, and ``−s·B₀A₀`` rides along as a frozen adapter. Checked here:
the Fisher of the 4-bit model is that of a full-precision model holding its dequantised weights; the
model's outputs are unchanged at initialisation (to fp32 rounding of the quantised model's own, so
within the quantisation's own error of the full-precision model's); training moves the forget
metrics; and the exported adapter is exactly the trained ``s·(BA − B₀A₀)`` and loads with stock
``peft`` on the full-precision base. Bad combinations are one line, and nothing is written.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers.workspace import build_workspace
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastunlearn import data as fdata
from fastunlearn import unlearn
from fastunlearn.cli import main
from fastunlearn.fisher import fila_init, fila_row_weights
from fastunlearn.fisher.fila import fila_record, lora_layers
from fastunlearn.models.loading import dequantized_weight, is_quantized, load_model_and_tokenizer

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("quantised"))


def _batches(ws, tokenizer):
    examples = {n: fdata.prepare(ws / f"{n}.json", tokenizer, name=n) for n in ("forget", "retain")}
    pad = fdata.pad_id_of(tokenizer)
    return [list(fdata.batches(examples[n], pad, 3)) for n in ("forget", "retain")]


def _lora(model):
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _logits(model, batch):
    with torch.no_grad():  # bitsandbytes' CPU kernel for 4-bit differs with and without autograd
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()


@pytest.mark.parametrize("bits", [4, 8])
def test_fila_on_a_quantised_base_leaves_the_model_unchanged(workspace, bits):
    full, tokenizer = load_model_and_tokenizer(workspace / "model")
    quant, _ = load_model_and_tokenizer(workspace / "model", **{f"load_in_{bits}bit": True})
    forget, retain = _batches(workspace, tokenizer)
    batch = forget[0]
    full_out, quant_out = _logits(full, batch), _logits(quant, batch)
    # The oracle: a full-precision model holding the dequantised weights computes what the quantised one
    # does (in fp32 up to the compute path's rounding), so its Fisher is the quantised model's.
    twin = AutoModelForCausalLM.from_pretrained(workspace / "model")
    for name, module in quant.named_modules():
        if is_quantized(module):
            twin.get_submodule(name).weight.data.copy_(dequantized_weight(module))
    quant, twin = _lora(quant), _lora(twin)
    rows = fila_row_weights(quant, forget, retain, progress=False)
    twin_rows = fila_row_weights(twin, forget, retain, progress=False)
    assert rows.keys() == twin_rows.keys() and len(rows) == 14
    for name in rows:
        # row weights sqrt(Σ F_f/(F_r+ε)) through one more fp32 matmul path: relative 1e-3 for 4-bit. 8-bit
        # computes in fp16: each F = (g·x)² squares an fp16 input (2^-11) and an output gradient that has
        # crossed every fp16 matmul above it (7 a layer, 2 layers), the ratio doubles that and the square
        # root halves it: tens of 2^-11, 2e-2.
        torch.testing.assert_close(rows[name], twin_rows[name], rtol=1e-3 if bits == 4 else 2e-2, atol=1e-6)
    fila_init(quant, row_weights=rows)
    assert all(is_quantized(layer.get_base_layer()) for _, (_, layer) in lora_layers(quant).items())
    after = _logits(quant, batch)
    # Unchanged: + s·B₀A₀x − s·B₀A₀x cancel to fp32 rounding of the logits' scale.
    scale = quant_out.abs().max().item()
    torch.testing.assert_close(after, quant_out, rtol=0, atol=1e-5 * scale)
    # ... so within the quantisation's own error of the full-precision model
    own_error = (quant_out - full_out).abs().max().item()
    assert own_error > 0 and (after - full_out).abs().max().item() <= own_error + 1e-5 * scale
    # nothing of the frozen residual in the state dict
    assert not any("residual" in key for key in quant.state_dict())


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    """A 4-bit LoRA and a 4-bit FILA run (gradient ascent: on this untrained model the forget NLL can
    only go up), and the model each trained."""
    found = {}
    for init in ("lora", "fila"):
        found[init] = unlearn(
            str(workspace / "model"), None, str(workspace / "forget.json"), str(workspace / "retain.json"),
            init=init, method="ga", output_dir=tmp_path_factory.mktemp(init), load_in_4bit=True, num_epochs=2,
            batch_size=3, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_epochs=0, lora_r=4,
            lora_alpha=8, progress=False, seed=1,
        )  # fmt: skip
    return found


@pytest.mark.parametrize("init", ["lora", "fila"])
def test_a_4bit_run_moves_the_forget_metrics(runs, init):
    metrics = runs[init].metrics
    before, after = metrics["before"]["forget"], metrics["after"]["forget"]
    assert after["nll"] > before["nll"] + 0.05, (before, after)


@pytest.mark.parametrize("init", ["lora", "fila"])
def test_the_adapter_is_the_trained_update_for_the_full_precision_base(runs, workspace, init):
    result = runs[init]
    tensors = load_file(f"{result.adapter_path}/adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    loaded = PeftModel.from_pretrained(base, result.adapter_path)
    checked = 0
    for full_name, layer in lora_layers(result.model).values():
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        s = float(layer.scaling["default"])
        trained = s * B @ A
        record = fila_record(layer)
        if init == "fila":  # what the run trained is s·(BA − B₀A₀) on the quantised base
            trained -= s * record.B0.double() @ record.A0.double()
        key = full_name.removeprefix("base_model.model.")
        A_out = tensors[f"base_model.model.{key}.lora_A.weight"].double()
        B_out = tensors[f"base_model.model.{key}.lora_B.weight"].double()
        scaling = float(loaded.get_submodule(full_name).scaling["default"])
        assert A_out.shape[0] == (8 if init == "fila" else 4)  # rank 2r: [B, −B₀]·[A; A₀]
        # fp32 factors multiplied in fp64 on both sides: fp32 rounding of the factors only
        torch.testing.assert_close(scaling * B_out @ A_out, trained, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == 14
    # Functionally: the full-precision base with the adapter is the trained 4-bit model, up to the
    # quantisation error (measured on the same input, before any adapter).
    tokenizer = result.tokenizer
    forget, _ = _batches(workspace, tokenizer)
    batch = forget[0]
    quant, _ = load_model_and_tokenizer(workspace / "model", load_in_4bit=True)
    full = AutoModelForCausalLM.from_pretrained(workspace / "model")  # `base` now holds the adapter
    own_error = (_logits(quant, batch) - _logits(full, batch)).abs().max().item()
    assert (_logits(loaded, batch) - _logits(result.model, batch)).abs().max().item() <= 3 * own_error


@pytest.mark.parametrize(
    ("extra", "missing", "message"),
    [
        (["--load-in-4bit"], "bitsandbytes", "--load-in-4bit needs the bitsandbytes package"),
        (["--load-in-4bit", "--init", "full"], None, "--load-in-4bit: quantised weights do not train"),
        (["--load-in-4bit", "--load-in-8bit"], None, "exclude each other"),
        (
            ["--load-in-8bit", "--merge"],
            None,
            "--load-in-8bit excludes --merge (a merged model would bake in",
        ),
    ],
)
def test_bad_quantised_runs_are_one_line_and_write_nothing(
    workspace, tmp_path, monkeypatch, capsys, extra, missing, message
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == missing else find_spec(name)
    )
    out = tmp_path / "out"
    argv = ["unlearn", str(workspace / "model"), "--forget", str(workspace / "forget.json")]
    assert main([*argv, "--retain", str(workspace / "retain.json"), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
