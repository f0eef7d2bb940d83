"""Running a function on 2 CPU ranks over gloo from a test: a free port, ``torch.multiprocessing.spawn``,
the launcher's environment for subprocesses started by hand, ``fastunlearn`` under torchrun or as
ranks started by hand, and the tolerance of an evaluation the ranks share."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fastunlearn.engines import distributed

# An evaluation shared by the ranks batches other examples together than one process does: the same
# maths with fp32 reductions in another order (matmul blocking, softmax over another padded width).
# Each reduction of K ≤ 2⁸ terms in the tests' tiny models (hidden ≤ 64, sequences under 64 tokens,
# vocabulary ≤ 300) is exact to K·2⁻²⁴ relative to the sum of the magnitudes, and an answer token's
# NLL is a difference of O(1)-sized logits and their log-sum-exp; a factor 2⁴ covers the two layers'
# compounding. Everything smooth computed from the per-item NLLs (probabilities, truth ratios,
# means) inherits the bound.
EVAL_RTOL = EVAL_ATOL = 2.0**8 * 2.0**-24 * 2.0**4


def assert_results_close(got, want, where: str = "") -> None:
    """Nested evaluation results equal: floats within ``EVAL_RTOL``/``EVAL_ATOL``, the rest exactly."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_results_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_results_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= EVAL_ATOL + EVAL_RTOL * abs(want), (where, got, want)
    else:
        assert got == want, (where, got, want)


ROOT = Path(__file__).resolve().parents[2]  # the repository


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, store: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1)  # spawn's deadline dumps every rank's stack before it kills
    distributed.join_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        distributed.leave_group()


def spawn(fn: Callable, *args, world: int = 2, timeout: float = 300) -> None:
    """``fn(rank, *args)`` on ``world`` processes joined in one gloo group (``fn`` must be importable);
    ranks still running after ``timeout`` seconds print their stacks and are killed: a rank waiting
    for ever (a collective, a lock another process left) fails the test instead of hanging the suite.

    The ranks meet through a file, not a TCP port: a port found free here can be taken by another
    process before the ranks bind it (a setup error that depends on what else the machine runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ranks = mp.spawn(_entry, args=(world, store, fn, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in ranks.processes:  # one stack at a time: they print to one stderr
                    os.kill(process.pid, signal.SIGUSR1)
                    time.sleep(0.5)
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world} ranks did not finish in {timeout:g} s")


def launcher_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun sets for one worker."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    return env


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``fastunlearn ARGS`` on ``nproc`` processes started by ``torch.distributed.run``, from the
    repository root."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "fastunlearn", *args,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)


def run_ranks(args: list[str], world: int = 2, timeout: float = 120) -> list[tuple[int, str]]:
    """``python -m fastunlearn *args`` as ``world`` ranks started by hand (what torchrun would start, without
    its agent's report of a failed rank): ``(exit code, stderr)`` of each rank."""
    return run_command_ranks([sys.executable, "-m", "fastunlearn", *args], world, timeout)


def run_command_ranks(command: list[str], world: int = 2, timeout: float = 120) -> list[tuple[int, str]]:
    """``command`` as ``world`` ranks started by hand: ``(exit code, stderr)`` of each rank."""
    port = free_port()
    procs = [
        subprocess.Popen(command, env=launcher_env(r, world, port), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]  # fmt: skip
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errors)]
