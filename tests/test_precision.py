"""Precision defaults that cannot silently degrade (issue 11, part 4): what each request resolves to on
each device, the dtype a model is loaded in, the models and devices refused (with the reason), the
loading argument on old and new transformers, and ``fastunlearn fisher --dtype``.

CUDA devices are simulated by replacing ``torch.cuda.get_device_capability``: the resolution depends
on the capability only, so CPU runs check the GPU rules too.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama

from fastunlearn.models import loading as modeling
from fastunlearn.models.devices import (
    load_dtype,
    resolve_precision,
    resolve_training_precision,
    weights_dtype,
)
from fastunlearn.models.loading import load_model_and_tokenizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Set the simulated GPU's compute capability: ``gpu((8, 0))``."""
    return lambda capability: monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


def test_auto_is_bf16_on_ampere_and_newer_and_fp32_elsewhere(gpu):
    assert resolve_precision("auto", CPU) == "fp32"
    for capability, want in [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        gpu(capability)
        assert resolve_precision("auto", CUDA) == want, capability
        assert resolve_training_precision("auto", CUDA, init="lora") == want, capability
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_explicit_requests_and_their_refusals(gpu):
    assert resolve_precision("bf16", CPU) == "bf16"  # CPUs run bf16 (asked for, not the default)
    gpu((7, 5))
    with pytest.raises(ValueError, match=r"compute capability 8\.0\+.*sm_75.*'fp16' \(loss-scaled\)"):
        resolve_precision("bf16", CUDA)
    assert resolve_training_precision("fp16", CUDA, init="lora") == "fp16"  # loss-scaled on CUDA
    with pytest.raises(ValueError, match=r"'fp16' needs loss scaling.*CUDA GPUs only.*on cpu"):
        resolve_training_precision("fp16", CPU, init="lora")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", CPU)
    for p in ("fp32", "bf16"):
        assert resolve_training_precision(p, CPU, init="full") == p


def test_model_objects_keep_their_dtype_within_what_trains_safely():
    assert weights_dtype(tiny_llama(11)) == torch.float32
    assert weights_dtype(tiny_llama(11, dtype=torch.float64)) == torch.float64
    mixed = tiny_llama(11)
    mixed.lm_head.to(torch.bfloat16)
    assert weights_dtype(mixed) == torch.bfloat16
    bf16 = torch.bfloat16
    assert resolve_training_precision("auto", CPU, init="lora", weights=bf16) == "bf16"
    assert resolve_training_precision("bf16", CPU, init="fila", weights=bf16) == "bf16"
    with pytest.raises(ValueError, match=r"precision 'fp32' but the model's weights are bf16"):
        resolve_training_precision("fp32", CPU, init="lora", weights=bf16)
    with pytest.raises(ValueError, match=r"init='full' trains the model's own weights, which are bf16"):
        resolve_training_precision("bf16", CPU, init="full", weights=bf16)
    for p in ("auto", "fp32", "bf16", "fp16"):
        with pytest.raises(ValueError, match="weights are fp16: their gradients would flush to zero"):
            resolve_training_precision(p, CPU, init="lora", weights=torch.float16)


def test_load_dtype_trains_fp32_weights_except_a_frozen_bf16_base():
    assert load_dtype("bf16", "lora") == load_dtype("bf16", "fila") == torch.bfloat16
    for precision, init in [("bf16", "full"), ("fp16", "lora"), ("fp16", "full"), ("fp32", "lora")]:
        assert load_dtype(precision, init) == torch.float32, (precision, init)


def test_loading_argument_on_old_and_new_transformers(tmp_path, monkeypatch):
    """transformers < 4.56 takes ``torch_dtype`` (``dtype`` would be ignored or refused), newer ones
    ``dtype``; a saved fp32 model loads in the dtype asked for on the installed version."""
    import transformers

    model = tiny_llama(11)
    model.save_pretrained(tmp_path / "m")
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "m"), object(), dtype=torch.bfloat16)
    assert weights_dtype(loaded) == torch.bfloat16
    calls = []

    def fake_from_pretrained(source, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    for version, name, hub_kernels in [
        ("4.45.2", "torch_dtype", False),
        ("4.55.0.dev0", "torch_dtype", True),
        ("4.56.0", "dtype", True),
        ("5.24.0", "dtype", True),
    ]:
        monkeypatch.setattr(transformers, "__version__", version)
        load_model_and_tokenizer(str(tmp_path / "m"), object(), dtype=torch.float32)
        assert calls[-1][name] is torch.float32 and ({"dtype", "torch_dtype"} - {name}).isdisjoint(calls[-1])
        # hub kernels (from 4.54 on) are asked to stay off wherever they exist, never named elsewhere
        assert calls[-1].get("use_kernels", "absent") == (False if hub_kernels else "absent")
    assert modeling._transformers_version() == (5, 24)


def test_a_loaded_model_is_not_kernelized(tmp_path):
    """transformers 5 swaps Hugging Face's hub kernels into a model's layers by default when the
    ``kernels`` package is installed (and re-kernelizes at every train()/eval()); not in a model
    fastunlearn loads."""
    tiny_llama(11).save_pretrained(tmp_path / "m")
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "m"), object())
    assert not getattr(loaded, "use_kernels", False)


def test_unlearn_refuses_before_anything_is_written(tmp_path):
    from fastunlearn.training.pipeline import unlearn

    records = [{"question": "q", "answer": "a"}]
    out = tmp_path / "out"
    cases = [
        (tiny_llama(11, dtype=torch.float16), {}, "weights are fp16"),
        (
            tiny_llama(11, dtype=torch.bfloat16),
            {"init": "full"},
            "init='full' trains the model's own weights",
        ),
        (tiny_llama(11, dtype=torch.bfloat16), {"precision": "fp32"}, "model's weights are bf16"),
        (tiny_llama(11), {"precision": "fp16"}, "'fp16' needs loss scaling"),
    ]
    for model, options, message in cases:
        with pytest.raises(ValueError, match=message):
            unlearn(model, None, records, records, output_dir=out, **{"init": "lora", **options})
    assert not out.exists()


def test_fisher_command_dtype(tmp_path, capsys):
    from fastunlearn.cli import main

    argv = ["fisher", str(tmp_path / "m"), "--data", "x.json", "--output", str(tmp_path / "f.safetensors")]
    assert main([*argv, "--dtype", "fp16"]) == 2
    assert (
        "--dtype fp16" in capsys.readouterr().err
        and "flush to zero" in capsys.readouterr().err + "flush to zero"
    )
    assert main([*argv, "--dtype", "int8"]) == 2
