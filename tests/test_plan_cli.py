"""``fastunlearn plan``: the memory plan on the command line (JSON and table) and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastunlearn.cli import main
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.plan import KNOWN_MODELS, model_config, plan_memory

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1001,
}
RUN = ["--batch-size", "2", "--max-length", "48", "--rank", "4", "--fisher-memory", "1MiB"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY))
    return path


@pytest.mark.parametrize(
    "flags, options, where",
    [
        ([], {}, {}),
        (
            ["--init", "lora", "--method", "gd", "--no-fused"],
            {"init": "lora", "method": "gd", "fused": False},
            {},
        ),
        (
            ["--gradient-checkpointing", "--device", "cpu"],
            {"gradient_checkpointing": True},
            {"device": "cpu"},
        ),
        (["--engine", "fsdp", "--world-size", "4"], {}, {"engine": "fsdp", "world_size": 4}),
    ],
)
def test_json_is_the_plan_of_the_options(model_dir, flags, options, where, capsys):
    assert main(["plan", str(model_dir), *RUN, *flags, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = UnlearnConfig(
        model=model_dir, batch_size=2, max_length=48, lora_r=4, fisher_memory="1MiB", **options
    )
    assert printed == plan_memory(cfg, **where).to_json()


def test_table_names_every_phase_and_the_deciding_one(model_dir, capsys):
    assert main(["plan", str(model_dir / "config.json"), *RUN, "--terms"]) == 0
    out = capsys.readouterr().out
    plan = plan_memory(
        UnlearnConfig(model=model_dir, batch_size=2, max_length=48, lora_r=4, fisher_memory="1MiB")
    )
    for phase in plan.phases:
        assert any(line.startswith(phase.name) for line in out.splitlines())
    assert "peak" in out and plan.peak_phase.name in out.splitlines()[-len(plan.notes) - 1]
    assert "weights (frozen)" in out and "activations" in out  # --terms: the bytes by kind


def test_an_adapter_is_planned_on_its_base(model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_dir)}))
    plans = []
    for model in (adapter, model_dir):
        assert main(["plan", str(model), *RUN, "--json"]) == 0
        plans.append(json.loads(capsys.readouterr().out)["phases"])
    assert plans[0] == plans[1]


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_the_well_known_models_build(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name))
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(float(name.rsplit("-", 1)[1].rstrip("b")), rel=0.12)


@pytest.mark.parametrize(
    "source, message",
    [
        (
            "llama-9b",
            "'llama-9b' is not a model directory, a config.json, a Hub id in the local cache nor a known",
        ),
        ("nobody/no-such-model", "'nobody/no-such-model' is not a model directory"),
        ({"model_type": "gpt9"}, "model_type 'gpt9' is not one transformers knows"),
        (
            {**TINY, "model_type": "llama", "num_attention_heads": 5},
            "transformers cannot build a 'llama' config",
        ),
        ({**TINY, "num_attention_heads": 5}, "the plan's 'before training' step cannot run a 'qwen2' model"),
        ("[1, 2]", "config.json: expected a JSON object, got list"),
    ],
)
def test_bad_models_are_one_line_exit_2(source, message, tmp_path, capsys):
    if not isinstance(source, str) or source.startswith("["):
        path = tmp_path / "config.json"
        path.write_text(source if isinstance(source, str) else json.dumps(source))
        source = str(path)
    assert main(["plan", source]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastunlearn plan: error:") and message in err and err.count("\n") == 1, err


def test_bad_options_are_one_line_exit_2(model_dir, capsys):
    assert main(["plan", str(model_dir), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "MODEL" in capsys.readouterr().err.upper()
