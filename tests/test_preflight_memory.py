"""``unlearn`` refuses, before the weights load, a run whose memory plan does not fit the device.

The device's capacity is injected (``pipeline.available_memory``) so the tiny workspace model is
refused; the refusal must carry the plan of the run's own options (compared with an independent
:func:`plan_memory` call made with the values the run implies), happen before any weight is read, and
be skipped by ``memory_check=False`` / ``--no-memory-check``. A model the plan cannot run is run with a
warning, not refused; under several processes the main one decides for all.
"""

from __future__ import annotations

import json
import os

import pytest
from helpers.distributed import spawn
from helpers.workspace import build_workspace
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fastunlearn import data as fdata
from fastunlearn.cli import main
from fastunlearn.engines import base as engines_base
from fastunlearn.models.devices import training_device
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.plan import plan_memory
from fastunlearn.training import pipeline
from fastunlearn.training.pipeline import unlearn


class Loaded(Exception):
    """Raised instead of loading the weights: the run got past every check."""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("memory"))


@pytest.fixture
def weights_reached(monkeypatch):
    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)


def capacity(monkeypatch, available: int) -> None:
    monkeypatch.setattr(pipeline, "available_memory", lambda device: available)


OPTIONS = dict(
    template="phi",
    lora_r=4,
    batch_size=2,
    fisher_batch_size=3,
    eval_batch_size=5,
    gradient_checkpointing=True,
    progress=False,
)


def expected_plan(ws, model=None):
    """The plan the run's options imply, made without the run's code: every example as long as the
    longest one, on this machine's device, in its precision (fp32 on the CPU)."""
    tokenizer = AutoTokenizer.from_pretrained(ws / "model")
    tokens = max(
        len(e.input_ids)
        for name in ("forget", "retain")
        for e in fdata.prepare(ws / f"{name}.json", tokenizer, name=name, template="phi")
    )
    cfg = UnlearnConfig(model=model or ws / "model", **OPTIONS)
    config = AutoConfig.from_pretrained(ws / "model")
    return plan_memory(cfg, config=config, tokens=tokens, device=training_device().type, precision="fp32")


def test_a_run_that_cannot_fit_is_refused_with_its_plan_before_the_weights_load(
    ws, tmp_path, monkeypatch, weights_reached
):
    plan = expected_plan(ws)
    capacity(monkeypatch, plan.peak_bytes - 1)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as refused:
        unlearn(ws / "model", None, ws / "forget.json", ws / "retain.json", output_dir=out, **OPTIONS)
    first, table = str(refused.value).split("\n", 1)
    peak = max(plan.phases, key=lambda p: p.peak_bytes)
    assert f"phase {peak.name!r}" in first
    assert f"({plan.peak_bytes} bytes)" in first and f"({plan.peak_bytes - 1} bytes) is available" in first
    assert "memory_check=False" in first
    assert "use gradient_checkpointing" not in first  # it is on already
    assert table == plan.format_table()  # the plan of the run's options, as `fastunlearn plan` prints it
    assert not out.exists()  # nothing written

    # One byte more and the same run passes the check (and reaches the weights).
    capacity(monkeypatch, plan.peak_bytes)
    with pytest.raises(Loaded):
        unlearn(ws / "model", None, ws / "forget.json", ws / "retain.json", output_dir=out, **OPTIONS)


def test_memory_check_false_runs_anyway(ws, tmp_path, monkeypatch, weights_reached):
    capacity(monkeypatch, 0)
    with pytest.raises(Loaded):
        unlearn(
            ws / "model",
            None,
            ws / "forget.json",
            ws / "retain.json",
            output_dir=tmp_path / "out",
            memory_check=False,
            **OPTIONS,
        )


def test_command_line_refusal_and_no_memory_check(ws, tmp_path, monkeypatch, weights_reached, capsys):
    capacity(monkeypatch, 0)
    argv = ["unlearn", str(ws / "model"), "--forget", str(ws / "forget.json"), "--retain"]
    argv += [str(ws / "retain.json"), "--output", str(tmp_path / "out"), "--template", "phi", "--rank", "4"]
    assert main(argv) == 2
    first, *rest = capsys.readouterr().err.splitlines()
    assert "does not fit" in first and "pass --no-memory-check to run anyway" in first
    assert "--batch-size, --max-length or --rank, use --gradient-checkpointing," in first
    # The table is printed as `fastunlearn plan` prints it: no option names rewritten into flags.
    assert any("method=ihl, init=fila" in line for line in rest)
    assert any(line.startswith("train_step") for line in rest)
    with pytest.raises(Loaded):
        main([*argv, "--no-memory-check"])


def test_a_model_the_plan_cannot_run_is_run_with_a_warning(ws, tmp_path, monkeypatch, weights_reached):
    def fails(*args, **kwargs):
        raise ValueError("transformers cannot build a 'custom' causal LM from this config (no such class)")

    capacity(monkeypatch, 0)
    monkeypatch.setattr(pipeline, "plan_memory", fails)
    skipped = r"memory check skipped: no memory plan for this model \(transformers cannot build"
    with pytest.warns(UserWarning, match=skipped), pytest.raises(Loaded):
        unlearn(
            ws / "model", None, ws / "forget.json", ws / "retain.json", output_dir=tmp_path / "o", **OPTIONS
        )


def test_a_model_object_counts_its_resident_weights(ws, tmp_path, monkeypatch):
    def placed(model):
        raise Loaded

    monkeypatch.setattr(engines_base, "to_training_device", placed)  # the first step after the checks
    model = AutoModelForCausalLM.from_pretrained(ws / "model")
    tokenizer = AutoTokenizer.from_pretrained(ws / "model")
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = expected_plan(ws, model)
    # The plan counts the weights the module already holds: available = capacity + resident.
    capacity(monkeypatch, plan.peak_bytes - resident - 1)
    sets = (ws / "forget.json", ws / "retain.json")
    with pytest.raises(ValueError, match=rf"\({plan.peak_bytes - 1} bytes\) is available"):
        unlearn(model, tokenizer, *sets, output_dir=tmp_path / "o", **OPTIONS)
    assert not (tmp_path / "o").exists()
    capacity(monkeypatch, plan.peak_bytes - resident)
    with pytest.raises(Loaded):
        unlearn(model, tokenizer, *sets, output_dir=tmp_path / "o", **OPTIONS)


def _two_ranks(rank: int, ws: str, out: str) -> None:
    """Rank 0's capacity decides: a tiny capacity on rank 1 alone is not a refusal; on rank 0 it is
    every rank's."""
    import fastunlearn.training.pipeline as mc

    def load(*args, **kwargs):
        raise Loaded

    AutoModelForCausalLM.from_pretrained = load
    results = []
    for tiny_on in (1, 0):
        mc.available_memory = lambda device, tiny=(rank == tiny_on): 0 if tiny else 1 << 50
        try:
            unlearn(
                os.path.join(ws, "model"),
                None,
                os.path.join(ws, "forget.json"),
                os.path.join(ws, "retain.json"),
                output_dir=os.path.join(out, f"run{tiny_on}"),
                **OPTIONS,
            )
        except Loaded:
            results.append("loaded")
        except ValueError as err:
            results.append(str(err).split("\n", 1)[0])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_under_several_processes_the_main_one_decides(ws, tmp_path):
    spawn(_two_ranks, str(ws), str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0][0] == results[1][0] == "loaded"
    assert results[0][1] == results[1][1] and "does not fit" in results[0][1]
