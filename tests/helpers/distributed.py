"""Running a function on 2 CPU ranks over gloo from a test: a free port, ``torch.multiprocessing.spawn``,
and the launcher's environment for subprocesses started by hand."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, *args, world: int = 2) -> None:
    """``fn(rank, *args)`` on ``world`` processes joined in one gloo group (``fn`` must be importable)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


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
