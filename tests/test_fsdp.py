"""FSDP (torch's FSDP2 ``fully_shard``) runs of ``unlearn``, checked on 2 CPU ranks over gloo.

A 2-rank FSDP run must train the adapter a single process trains on the same global batch. The two
agree in exact arithmetic when every rank's micro-batch holds as many label tokens as every other's
(each rank's loss is a token mean and FSDP averages the ranks' gradients), so the data are ``text``
records cut at ``max_length``: every example has exactly ``max_length`` tokens, all labelled. They
differ by the order of floating-point sums (FSDP reduce-scatters the gradients; the matmuls run on
other batch shapes), which AdamW can amplify: its step ``lr·g/(|g|+ε)`` has slope at most ``1/ε`` in
``g``, so a gradient element perturbed by ``δ`` moves the weight by up to ``lr·δ/ε``. In fp32 that
bound (``δ ≈ 2⁻²⁴`` of a clipped gradient of norm ≤ 1, over ε = 1e-8) is larger than the step itself;
the runs are therefore made in fp64, where ``δ ≤ K·2⁻⁵³`` for sums of ``K`` terms (K ≤ 10³ here) and
each step moves an element by at most ``lr·K·2⁻⁵³/ε`` more — the bound asserted, per step.

The FILA run checks the export: written once by the main process, the adapter of rank ``2r`` loads
with stock ``peft.PeftModel.from_pretrained`` on the original base, and the merged model equals it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.distributed import run_ranks, spawn, torchrun
from helpers.fisher import fisher_llama, make_batch
from helpers.oracles import assert_close
from helpers.workspace import build_workspace

from fastunlearn import demo
from fastunlearn.engines.fsdp import FsdpEngine, FsdpPlan, check_single_engine, parse_fsdp, shard_model
from fastunlearn.fisher import estimate_fisher
from fastunlearn.models.naming import canonical_name, strip_wrappers
from fastunlearn.options.unlearn import UnlearnConfig

N_FISHER_BATCHES = 4  # as many per rank: a sharded forward is a collective every rank joins
MAX_LENGTH = 12
N_FORGET = 8  # two optimiser steps of 2 ranks x 2 examples
LR = 1e-3
SUM_TERMS = 1000  # the longest floating-point sum of a step (tokens x width x batch), rounded up
FSDP = "full_shard auto_wrap"
# Holds from the first evaluation (a barely trained model extracts nothing and assigns the texts
# little probability); one more evaluation, then the first state is put back: the restore path on
# sharded parameters. EL10 makes every evaluation decode greedily on the sharded model.
STOPPING = dict(stop="forget.prob<=0.999,forget.el10<=0.999", eval_every=1, patience=1, restore="first")

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.filterwarnings("ignore:.*examples were truncated:UserWarning"),  # on purpose (docstring)
]


# ---------------------------------------------------------------------------------------------------
# Options


def test_fsdp_words():
    assert parse_fsdp("full_shard auto_wrap") == FsdpPlan(True, True, False)
    assert parse_fsdp("shard_grad_op,offload") == FsdpPlan(False, False, True)
    for bad, match in (
        ("hybrid_shard", "unknown word.*hybrid_shard"),
        ("full_shard shard_grad_op", "exclude each other"),
        ("auto_wrap auto_wrap", "repeats"),
        ("  ", "names no option"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_fsdp(bad)
    with pytest.raises(ValueError, match="unknown word"):
        UnlearnConfig(fsdp="zero3")  # refused when the options are made, before anything loads


def test_one_sharding_engine():
    check_single_engine(fsdp="full_shard", deepspeed=None)
    with pytest.raises(ValueError, match="fsdp and deepspeed exclude each other"):
        check_single_engine(fsdp="full_shard", deepspeed="ds.json")


def test_wrapper_names_are_stripped():
    fsdp1 = "_fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.base_layer.weight"  # noqa: E501
    assert strip_wrappers(fsdp1) == "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"
    assert strip_wrappers("module._orig_mod.lm_head.weight") == "lm_head.weight"
    assert canonical_name(fsdp1) == "model.layers.0.mlp.up_proj"


def test_gathered_state_of_one_process():
    # Names as FSDP1 gives its parameters; one process: the tensors themselves, copied to the CPU.
    model = torch.nn.Module()
    model._fsdp_wrapped_module = torch.nn.Linear(3, 2)
    model.head = torch.nn.Linear(2, 2)
    model.head.requires_grad_(False)
    gathered_state = FsdpEngine(parse_fsdp("full_shard")).gathered_state
    state = gathered_state(model, trainable_only=True)
    assert set(state) == {"weight", "bias"}
    assert torch.equal(state["weight"], model._fsdp_wrapped_module.weight)
    assert state["weight"].data_ptr() != model._fsdp_wrapped_module.weight.data_ptr()
    assert set(gathered_state(model, trainable_only=False)) == {"weight", "bias", "head.weight", "head.bias"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = build_workspace(tmp_path_factory.mktemp("fsdp"))
    data = demo.generate_dataset(4, seed=1)
    texts = [f"{r['question']} {r['answer']}" for r in data["forget_perturbed"] + data["retain_perturbed"]]
    demo.write_jsonl(str(root / "forget_text.json"), [{"text": t} for t in texts[:N_FORGET]])
    demo.write_jsonl(str(root / "retain_text.json"), [{"text": t} for t in texts[N_FORGET : 2 * N_FORGET]])
    return root


def test_fsdp_without_a_process_group_is_one_error(workspace, tmp_path, capsys):
    from fastunlearn.cli import main

    out = tmp_path / "o"
    argv = ["unlearn", str(workspace / "model"), "--forget", str(workspace / "forget.json"), "--retain",
            str(workspace / "retain.json"), "--output", str(out), "--fsdp", FSDP]  # fmt: skip
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "fsdp" in err[0] and "torchrun" in err[0], err
    assert not out.exists()  # refused before the output directory or the weights


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"resume": True}, "resume"),
        ({"init": "full"}, "init='full'"),
        pytest.param(
            {"fsdp": "full_shard offload"},
            "offload.*no GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="offload is refused without a GPU"),
        ),
    ],
)
def test_fsdp_refuses_what_it_does_not_support(workspace, tmp_path, option, match):
    from fastunlearn import unlearn

    with pytest.raises(ValueError, match=match):
        unlearn(str(workspace / "model"), None, workspace / "forget.json", workspace / "retain.json",
                output_dir=tmp_path / "o", progress=False, **{"fsdp": FSDP, **option})  # fmt: skip
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# 2 ranks


def _options(batch_size: int, **extra) -> dict:
    options = dict(data_format="text", max_length=MAX_LENGTH, num_epochs=1, batch_size=batch_size,
                   gradient_accumulation_steps=1, warmup_epochs=0, lora_r=4, lora_alpha=8,
                   fisher_batch_size=2, learning_rate=LR, ihl_backend="torch", progress=False,
                   seed=3)  # fmt: skip
    return {**options, **extra}


def _fp64_run(ws: Path, out: Path, batch_size: int, **extra) -> None:
    """An init='lora' run of the workspace model in fp64 (LoRA layers made in fp64 too)."""
    from transformers import AutoModelForCausalLM

    from fastunlearn import unlearn

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float64)
        unlearn(model, str(ws / "model"), ws / "forget_text.json", ws / "retain_text.json", init="lora",
                output_dir=out, **_options(batch_size, **extra))  # fmt: skip
    finally:
        torch.set_default_dtype(default)


def _fisher_batches():
    return [make_batch(3, 7, seed=20 + i, pad_rows=[(1, 4 + i % 3)]) for i in range(N_FISHER_BATCHES)]


def _worker(rank: int, ws: str, root: str) -> None:
    from safetensors.torch import save_file

    from fastunlearn import unlearn

    # What torchrun sets: Trainer and accelerate read the ranks from the environment.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    ws_path, out = Path(ws), Path(root)
    _fp64_run(ws_path, out / "lora64", 2, fsdp=FSDP)
    # Micro-batches of 1 accumulated twice: FSDP's gradient reduction deferred to the second (no_sync).
    _fp64_run(ws_path, out / "accum64", 1, fsdp=FSDP, gradient_accumulation_steps=2)
    _fp64_run(ws_path, out / "stop64", 2, fsdp=FSDP, **STOPPING)
    unlearn(str(ws_path / "model"), None, ws_path / "forget_text.json", ws_path / "retain_text.json",
            init="fila", output_dir=out / "fila", merge=True,
            **_options(2, fsdp="shard_grad_op auto_wrap", gradient_checkpointing=True))  # fmt: skip
    # The Fisher hooks on a sharded model: they read layer inputs and output gradients, not weights.
    model = shard_model(fisher_llama(), parse_fsdp(FSDP))
    est = estimate_fisher(model, _fisher_batches(), mode="per_example", backend="torch", progress=False)
    save_file({k: v.contiguous() for k, v in est.items()}, str(out / f"fisher{rank}.safetensors"))


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def fsdp_runs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_runs")
    spawn(_worker, str(workspace), str(root))
    return root


def test_two_rank_fsdp_adapter_equals_one_process(workspace, fsdp_runs, tmp_path):
    one = tmp_path / "one"
    _fp64_run(workspace, one, 4)  # the same global batch: 2 ranks x 2, or 2 ranks x 1 x 2 accumulated
    a1 = _adapter(one)
    steps = json.loads((one / "metrics.json").read_text())["train"]["global_step"]
    assert steps == 2
    bound = steps * LR * SUM_TERMS * 2.0**-53 / 1e-8  # module docstring
    # The comparison can fail: lora_B starts at zero, and trained it moves by ~lr per step.
    assert max(float(v.abs().max()) for k, v in a1.items() if "lora_B" in k) > 100 * bound
    for name in ("lora64", "accum64"):
        two = fsdp_runs / name
        a2 = _adapter(two)
        assert set(a1) == set(a2) and a1
        assert json.loads((two / "metrics.json").read_text())["train"]["global_step"] == steps
        for key, want in a1.items():
            assert want.dtype == a2[key].dtype == torch.float64
            diff = float((a2[key] - want).abs().max())
            assert diff <= bound, (name, key, diff, bound)
        assert json.loads((two / "adapter" / "adapter_config.json").read_text())["r"] == 4
        assert json.loads((two / "run_config.json").read_text())["world_size"] == 2


def test_two_rank_fsdp_stops_keeps_and_restores_as_one_process(workspace, fsdp_runs, tmp_path):
    import warnings

    from fastunlearn.evaluation.stop_callback import read_trajectory

    one = tmp_path / "one"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*satisfies the stopping rule.*")
        _fp64_run(workspace, one, 4, **STOPPING)
    two = fsdp_runs / "stop64"
    s1, s2 = (json.loads((d / "metrics.json").read_text())["stopping"] for d in (one, two))
    for key in ("first_satisfied_step", "stopped_step", "kept_step", "restored", "evaluations"):
        assert s1[key] == s2[key], key
    assert s1["evaluations"] == 2 and s1["kept_step"] == 1 and s1["restored"] and s1["stopped_step"] == 2
    rows1, rows2 = read_trajectory(one / "trajectory.csv"), read_trajectory(two / "trajectory.csv")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [0, 1, 2]
    for r1, r2 in zip(rows1, rows2):
        for key in ("forget.prob", "forget.el10", "retain.prob", "retain.acc"):
            # fp64 metrics of the same states (the kept one within the adapter bound below): rounding.
            assert r2[key] == pytest.approx(r1[key], rel=1e-9, abs=1e-12), (r1["step"], key)
    # The state kept and put back is the state after step 1: that of a one-process run of one step
    # (the linear schedule's first step has the full rate either way), within the bound of
    # test_two_rank_fsdp_adapter_equals_one_process. The state after step 2 is a step (~lr) away.
    first = tmp_path / "first"
    _fp64_run(workspace, first, 4, num_epochs=0.5)
    assert json.loads((first / "metrics.json").read_text())["train"]["global_step"] == 1
    want, a1, a2 = _adapter(first), _adapter(one), _adapter(two)
    bound = s1["stopped_step"] * LR * SUM_TERMS * 2.0**-53 / 1e-8
    assert set(want) == set(a1) == set(a2) and want
    for key, value in want.items():
        assert float((a1[key] - value).abs().max()) <= bound, key
        assert float((a2[key] - value).abs().max()) <= bound, key


def test_fisher_hooks_on_a_sharded_model(fsdp_runs):
    from safetensors.torch import load_file

    ranks = [load_file(fsdp_runs / f"fisher{r}.safetensors") for r in range(2)]
    want = estimate_fisher(
        fisher_llama(), _fisher_batches(), mode="per_example", backend="torch", progress=False
    )
    assert set(ranks[0]) == set(ranks[1]) == set(want)
    for key, value in want.items():
        assert value.abs().max() > 0
        for got in ranks:
            # fp32 accumulators, the batches' sums added in another order (tests/test_distributed.py)
            assert_close(got[key], value, rtol=4 * N_FISHER_BATCHES * 2.0**-24)
        assert torch.equal(ranks[0][key], ranks[1][key])


def test_fsdp_outputs_written_once_and_load_on_the_base(workspace, fsdp_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = fsdp_runs / "fila"
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "fisher", "merged", "metrics.json",
                                       "run_config.json"]  # fmt: skip
    assert os.listdir(out / "checkpoints") == []  # no Trainer checkpoint under fsdp
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left beside it
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"before", "after", "train"}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8  # FILA's export: [B, -B0]·[A; A0] on the original base, rank 2r

    base = AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32)
    stock = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    ids = torch.randint(3, merged.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits.double(), stock(input_ids=ids).logits.double()
        original = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()(input_ids=ids).logits
    # The same fp32 model two ways (merged weights vs base + low-rank product): fp32 rounding of the
    # sums, relative to the logits' scale.
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-4 * scale
    assert float((original.double() - want).abs().max()) > 1e-3 * scale  # the adapter changed the model


# ---------------------------------------------------------------------------------------------------
# The command under torchrun


def _cli(ws: Path, out: Path, *extra: str) -> list[str]:
    return [
        "unlearn", str(ws / "model"), "--forget", str(ws / "forget.json"), "--retain",
        str(ws / "retain.json"), "--output", str(out), "--template", "phi", "--epochs", "1", "--batch-size",
        "2", "--grad-accum", "1", "--rank", "4", "--alpha", "8", "--fisher-batch-size", "2",
        "--no-progress", "--no-eval", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_torchrun_fsdp_unlearn(workspace, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(_cli(workspace, out, "--fsdp", FSDP, "--merge"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "fisher", "merged", "metrics.json",
                                       "run_config.json"]  # fmt: skip
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["world_size"] == 2 and run_config["options"]["fsdp"] == FSDP
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8  # FILA: 2r


@pytest.mark.skipif(torch.cuda.is_available(), reason="offload is refused without a GPU")
def test_refused_fsdp_run_stops_every_rank_with_one_line(workspace, tmp_path):
    out = tmp_path / "run"
    for code, err in run_ranks(_cli(workspace, out, "--fsdp", "full_shard offload")):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "offload" in lines[0], err[-3000:]
    assert not out.exists()
