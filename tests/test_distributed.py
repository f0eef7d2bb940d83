"""Runs on several processes (torchrun / accelerate launch), checked on 2 CPU ranks over gloo.

The Fisher passes split the batches between the ranks and all-reduce their fp32 accumulators, so the
estimate must equal one process's on all the data up to the order of the fp32 additions of the batches'
contributions (every contribution is non-negative, so each element's relative error is at most
``n_batches · 2⁻²⁴`` per addition); FILA's row weights must be bitwise identical on every rank. A run
under ``torchrun`` must write its output directory once, from the main process, and a refused run must
stop every rank with the same one-line error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.distributed import EVAL_ATOL, EVAL_RTOL, run_command_ranks, run_ranks, spawn, torchrun
from helpers.fisher import fisher_llama, fisher_record, make_batch
from helpers.oracles import assert_close
from helpers.workspace import build_workspace

from fastunlearn.engines import distributed

ROOT = Path(__file__).resolve().parents[1]
N_BATCHES = 5  # odd: the ranks get 3 and 2 batches


def _batches():
    return [make_batch(3, 7, seed=10 + i, pad_rows=[(1, 4 + i % 3)]) for i in range(N_BATCHES)]


def _fisher_worker(rank: int, out: str) -> None:
    from safetensors.torch import save_file

    assert distributed.is_distributed() and distributed.world_size() == 2
    assert len(distributed.shard(_batches())) == (3 if rank == 0 else 2)
    save_file(fisher_record(fisher_llama(), _batches), os.path.join(out, f"rank{rank}.safetensors"))


def test_two_rank_fisher_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    spawn(_fisher_worker, str(tmp_path))
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    want = fisher_record(fisher_llama(), _batches)
    assert set(ranks[0]) == set(ranks[1]) == set(want)
    rtol = 4 * N_BATCHES * 2.0**-24  # the batches' fp32 sums added in another order (module docstring)
    for key, value in want.items():
        for got in ranks:
            # d = sqrt(Σ_j F_f/(F_r+ε)): its relative error is at most that of the estimates.
            assert_close(got[key], value, rtol=rtol)
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same bits on every rank
    assert any(v.abs().max() > 0 for v in want.values())


def _make(path: str) -> str:
    os.makedirs(path)  # fails if it exists: a second writer would raise
    with open(os.path.join(path, "f"), "w"):
        pass
    return path


def _on_main_worker(rank: int, root: str) -> None:
    # Each round: the main process creates a fresh directory and a file in it; both ranks see the result.
    for round_ in range(4):
        path = os.path.join(root, f"r{round_}")
        got = distributed.on_main(lambda p=path: _make(p))
        assert got == path and os.listdir(path) == ["f"]
    with pytest.raises(FileExistsError, match="r0"):
        distributed.on_main(lambda: os.makedirs(os.path.join(root, "r0")))
    # A failure on rank 1 only reaches rank 0 too.
    with pytest.raises(ValueError, match="rank 1 says no"):
        distributed.on_all(lambda: (_ for _ in ()).throw(ValueError("rank 1 says no")) if rank == 1 else 0)


def test_on_main_writes_once_and_shares_errors(tmp_path):
    spawn(_on_main_worker, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["r0", "r1", "r2", "r3"]


# ---------------------------------------------------------------------------------------------------
# The command under torchrun


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("dist"))


def _unlearn_args(ws: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "unlearn", str(ws / "model"), "--forget", str(ws / "forget.json"), "--retain",
        str(ws / "retain.json"), "--output", str(out), "--template", "phi", "--epochs", "1",
        "--batch-size", str(batch_size), "--grad-accum", "1", "--rank", "4", "--alpha", "8",
        "--init", "fila", "--fisher-batch-size", "2", "--no-progress", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_torchrun_unlearn_matches_one_process_with_the_same_global_batch(workspace, tmp_path):
    from fastunlearn.cli import main

    out = tmp_path / "two"
    proc = torchrun(_unlearn_args(workspace, out, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "fisher", "metrics.json", "run_config.json"]
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"before", "after", "train"}
    # Again with --overwrite: built staged, swapped in once, nothing left beside it.
    proc = torchrun(_unlearn_args(workspace, out, 2, "--overwrite"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "fisher", "metrics.json", "run_config.json"]

    one = tmp_path / "one"
    assert main(_unlearn_args(workspace, one, 4)) == 0  # the same global batch: 2 ranks × 2
    before = json.loads((one / "metrics.json").read_text())["before"]
    # The ranks share the examples (each its own batches): one process's numbers up to fp32 rounding.
    assert set(before) == set(metrics["before"])
    for name, values in before.items():
        assert set(values) == set(metrics["before"][name])
        for key, value in values.items():
            got = metrics["before"][name][key]
            assert abs(got - value) <= EVAL_ATOL + EVAL_RTOL * abs(value), (name, key, got, value)
    a1, a2 = _adapter(one), _adapter(out)
    assert set(a1) == set(a2)
    diff = sum(float((a1[k] - a2[k]).double().norm() ** 2) for k in a1) ** 0.5
    size = sum(float(a1[k].double().norm() ** 2) for k in a1) ** 0.5
    # The ranks' gradients are averaged per rank's token mean, one process averages over all tokens of
    # the 4 pairs: equal only when the two halves hold as many tokens, so close but not equal.
    assert diff <= 0.05 * size, (diff, size)

    # Resuming (an interrupted run) on another number of processes is refused in one line.
    (out / "metrics.json").unlink()
    with pytest.raises(ValueError, match="started on 2 process"):
        from fastunlearn import unlearn

        unlearn(str(workspace / "model"), None, workspace / "forget.json", workspace / "retain.json",
                output_dir=out, resume=True, template="phi", progress=False)  # fmt: skip


def test_refused_run_stops_every_rank_with_one_line(workspace, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for code, err in run_ranks(_unlearn_args(workspace, out, 2)):
        assert code == 2, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "is not empty" in lines[0] and "notes.txt" in lines[0], err[-2000:]
    assert os.listdir(out) == ["notes.txt"]


def test_launcher_environment_without_a_group_is_one_error(workspace, tmp_path):
    env = dict(os.environ, WORLD_SIZE="2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "fastunlearn", *_unlearn_args(workspace, tmp_path / "o", 2)]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "WORLD_SIZE=2" in lines[0] and "MASTER_ADDR" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()


# What a run imports and builds while the group exists (the modules that bind the world group at import,
# a DDP wrapper caught in a reference cycle), then the exit hook: no gloo worker thread may be left to
# free a collective's tensors while the interpreter finalizes (an abort at exit, 1 run in ~20 before).
_LEAVE = """
import os, sys
from fastunlearn.engines import distributed
assert distributed.init_from_env()
import torch, torch.distributed.fsdp, transformers.models.llama.modeling_llama
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
ddp.cycle = [ddp]
distributed.broadcast_object({"rank": distributed.rank()})
del ddp
distributed.leave_group()
import time
for _ in range(50):  # gloo's transport loop ends asynchronously, within milliseconds of the destroy
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{t}/comm").read().strip())
        except FileNotFoundError:  # the thread ended while being listed
            pass
    left = [name for name in names if name.startswith(("pt_gloo", "gloo"))]
    if not left:
        break
    time.sleep(0.1)
sys.exit(f"gloo threads left after leaving the group: {left}" if left else 0)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_leaving_the_group_at_exit_joins_the_gloo_threads():
    for code, err in run_command_ranks([sys.executable, "-c", _LEAVE]):
        assert code == 0, err[-2000:]
