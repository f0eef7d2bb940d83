"""``fastunlearn plan``: the memory plan on the command line (JSON and table), its errors, and its help
loading neither PyTorch nor the plan's module before the command runs."""

from __future__ import annotations

import json

import pytest

from fastunlearn.cli import main
from fastunlearn.plan.memory_plan import KNOWN_MODELS, plan_memory


def test_json_is_the_plan(capsys):
    argv = ["plan", "llama3-8b", "--batch-size", "2", "--max-length", "384", "--rank", "16"]
    assert main([*argv, "--gradient-checkpointing", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = plan_memory(
        "llama3-8b", batch_size=2, max_length=384, rank=16, gradient_checkpointing=True, fused_linear=True
    )
    assert data == {
        "model": "llama3-8b",
        "phases": [{"name": p.name, "peak_bytes": p.peak_bytes} for p in want.phases],
        "peak_bytes": want.peak_bytes,
    }


@pytest.mark.parametrize(
    "flags, kwargs",
    [
        (["--method", "gd"], {"method": "gd", "fused_linear": True}),  # fused by default, as unlearn
        (["--method", "npo", "--no-fused"], {"method": "npo", "fused_linear": False}),
        (["--no-fused"], {"fused_linear": False}),
        (
            ["--engine", "fsdp", "--world-size", "4"],
            {"engine": "fsdp", "world_size": 4, "fused_linear": True},
        ),
        (["--init", "lora"], {"init": "lora", "fused_linear": True}),
    ],
)
def test_flags_reach_the_plan(flags, kwargs, capsys, tmp_path):
    config = tmp_path / "model"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(KNOWN_MODELS["llama2-7b"]))
    assert main(["plan", str(config), *flags, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] == plan_memory(config, **kwargs).peak_bytes


def test_table_names_every_phase(capsys):
    assert main(["plan", "llama2-7b"]) == 0
    out = capsys.readouterr().out
    for phase in plan_memory("llama2-7b", fused_linear=True).phases:
        assert phase.name in out


@pytest.mark.parametrize(
    "config, flags, message",
    [
        ({"model_type": "llama", "hidden_size": 64}, [], "config has no field 'intermediate_size'"),
        ({**KNOWN_MODELS["llama2-7b"], "model_type": "gpt2"}, [], "model_type 'gpt2'"),
        (KNOWN_MODELS["llama2-7b"], ["--max-length", "1"], "--max-length"),
        (KNOWN_MODELS["llama2-7b"], ["--batch-size", "0"], "--batch-size"),
    ],
)
def test_errors_exit_2_naming_the_problem(config, flags, message, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["plan", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastunlearn plan: error:") and message in err, err


def test_unknown_model_exits_2(capsys):
    assert main(["plan", "llama-9b"]) == 2
    assert "neither a known model" in capsys.readouterr().err
