"""The few ``torch.distributed`` operations a run under ``torchrun`` / ``accelerate launch`` needs.

A launcher starts one process per device and tells each its ``RANK`` / ``WORLD_SIZE`` (and the
rendezvous ``MASTER_ADDR`` / ``MASTER_PORT``) through the environment. :func:`init_from_env` joins the
process group those variables describe (``nccl`` with CUDA, ``gloo`` otherwise); ``transformers``'
``Trainer`` (through ``accelerate``) then finds it initialised and uses it, and the group is left at
exit (:func:`join_group` / :func:`leave_group`: so that no gloo thread outlives it into the interpreter's
finalization). Without a launcher every helper here is the single-process identity: rank 0 of 1, no
communication.

What a run does with them (``fastunlearn.training.run``): the main process (rank 0) alone checks,
clears, stages and writes the output directory (:func:`on_main`, which hands its result or its error
to every rank, so a refused run is the same one-line error everywhere and no rank waits forever), every
rank runs the checks that only read (:func:`on_all`, which raises the first failing rank's error on
every rank), and the Fisher passes split the batches between the ranks (:func:`shard`) and sum their
accumulators (:func:`all_reduce_sum`), so the estimate is that of one process on all the data.
"""

from __future__ import annotations

import atexit
import builtins
import gc
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "broadcast_object",
    "every_rank",
    "init_from_env",
    "is_distributed",
    "is_main",
    "join_group",
    "launched_world_size",
    "leave_group",
    "map_sharded",
    "mean",
    "on_all",
    "on_main",
    "parameters_sharded",
    "rank",
    "shard",
    "world_size",
]


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` a launcher set (1 without one); ``ValueError`` if it is not a positive integer."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not a positive integer")
    return size


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group a launcher describes, if there is one and it is not joined yet.

    Returns whether the run is distributed. Raises ``ValueError`` in one line when ``WORLD_SIZE > 1``
    but the group cannot be formed (``RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` missing, or the
    rendezvous fails): a launcher's environment without its processes.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    size = launched_world_size()
    if size == 1:
        return False
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={size} but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: start several processes with torchrun or "
            "accelerate launch, or unset WORLD_SIZE for one process"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from datetime import timedelta

    try:
        join_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    except Exception as err:  # the launcher's variables name no reachable group: one line, not a trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"WORLD_SIZE={size}: cannot join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({first})"
        ) from err
    atexit.register(leave_group)
    return True


def join_group(backend: str, **options: Any) -> None:
    """``torch.distributed.init_process_group(backend, **options)``, such that :func:`leave_group` ends it.

    A gloo worker thread frees each collective's tensors after the caller's ``wait()`` has returned,
    and freeing a tensor whose Python object has died takes the GIL: if that happens once the
    interpreter is finalizing, the thread is unwound and the process aborts ("terminate called without
    an active exception", exit -6), after a refused run as much as after a finished one. Destroying the
    group releases the GIL and joins those threads, but only if nothing else still holds the group:
    ``torch.distributed.nn`` binds the world group into its functions' default arguments when it is
    first imported, and FSDP and transformers' model modules import it. So it is imported here, while
    there is no group to bind.
    """
    import torch.distributed.nn as _binds_world_defaults  # noqa: F401

    dist.init_process_group(backend, **options)


def leave_group() -> None:
    """Destroy the process group, if there is one, while the interpreter is whole (at exit, before it
    finalizes): with :func:`join_group`'s, no gloo worker thread outlives it."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # wrappers in reference cycles (DDP and its reducer) still hold the group
        dist.destroy_process_group()


def is_distributed() -> bool:
    """A joined process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: rank ``r`` of ``W`` takes items ``r, r+W, r+2W, ...``."""
    return list(items[rank() :: world_size()])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (every rank gets the sum)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``tensor`` replaced, in place, by rank ``src``'s."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def mean(value: float) -> float:
    """The mean over the ranks of a per-rank number (``value`` itself in one process)."""
    if not is_distributed():
        return value
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, float(value))
    return sum(values) / len(values)


def every_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank (``flag`` itself in one process): a decision that ranks
    running collectives in step must take together, so that none leaves a loop the others stay in."""
    if not is_distributed():
        return bool(flag)
    flags: list[Any] = [None] * world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


def broadcast_object(obj: T) -> T:
    """The main process's ``obj`` on every rank (it must pickle); ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)  # through the current CUDA device under NCCL
    return box[0]


def parameters_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are split between the ranks: FSDP (1 or 2) or DeepSpeed ZeRO-3.

    Each of their forwards gathers the weights from every rank, so every rank must run the same
    forwards in the same order: evaluation cannot give the ranks different items.
    """
    if not is_distributed():
        return False
    for module in model.modules():
        names = {cls.__name__ for cls in type(module).__mro__}
        if names & {"FullyShardedDataParallel", "FSDPModule"}:
            return True
    # ZeRO-3 marks its partitioned parameters with ds_id; FSDP2 holds DTensors.
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in model.parameters())


def _in_item_order(parts: list[Any], n: int) -> Any:
    """Rank ``r``'s results for items ``r, r+W, ...`` (``None`` for an empty share) put back in item order:
    lists by element, tensors (and dicts of them) along dimension 0."""
    world = len(parts)
    filled = [(r, p) for r, p in enumerate(parts) if p is not None]
    first = filled[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_empty((n, *first.shape[1:]))
        for r, p in filled:
            out[r::world] = p
        return out
    if isinstance(first, dict):
        return {key: _in_item_order([None if p is None else p[key] for p in parts], n) for key in first}
    items: list[Any] = [None] * n
    for r, p in filled:
        items[r::world] = list(p)
    return items


def _cpu(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.cpu()
    if isinstance(result, dict):
        return {key: _cpu(value) for key, value in result.items()}
    return list(result)


def map_sharded(
    fn: Callable[[list[T]], Any], items: Sequence[T], *, model: torch.nn.Module | None = None
) -> Any:
    """``fn(items)`` computed by the ranks together: each runs ``fn`` on its :func:`shard` (items
    ``r, r+W, ...``), and the per-item results are gathered in item order on every rank.

    ``fn`` maps a list of items to one result per item: a list, a tensor or a dict of tensors, indexed
    by item along dimension 0 (gathered to the CPU under several processes). The result is
    ``fn(items)`` up to what the batching inside ``fn`` changes in rounding. ``fn`` is not called on a
    rank with no items (more ranks than items). If ``fn`` raises on any rank, every rank raises the
    lowest failing rank's error (:func:`on_all`). ``model``: the model ``fn`` runs; when its weights are
    split between the ranks (:func:`parameters_sharded`) every rank runs ``fn`` on all the items, in
    step. In one process, and for no items: ``fn(list(items))``.
    """
    if not is_distributed() or not items or (model is not None and parameters_sharded(model)):
        return fn(list(items))
    part = shard(items)
    local = on_all(lambda: _cpu(fn(part)) if part else None)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local)
    return _in_item_order(parts, len(items))


def _describe(err: BaseException) -> tuple[str, str]:
    """An error as (builtin exception name, message): what every rank can re-create."""
    for cls in type(err).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__, str(err)
    return "RuntimeError", str(err)


def _raise(described: tuple[str, str]) -> None:
    name, message = described
    cls = getattr(builtins, name, RuntimeError)
    raise cls(message)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and return its result on every rank (it must pickle).

    If ``fn`` raises, the main process re-raises its error and every other rank raises the same
    builtin exception type with the same message, so all exit together with one line each.
    """
    if not is_distributed():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # handed to the other ranks, then re-raised here
            error = err
    outcome = broadcast_object(("error", _describe(error)) if error is not None else ("ok", result))
    if error is not None:
        raise error
    if outcome[0] == "error":
        _raise(outcome[1])
    return outcome[1]


def on_all(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised on any, every rank raises the lowest failing rank's error."""
    if not is_distributed():
        return fn()
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as err:  # agreed on below, then re-raised
        error = err
    outcomes: list[Any] = [None] * world_size()
    dist.all_gather_object(outcomes, None if error is None else _describe(error))
    failed = next((o for o in outcomes if o is not None), None)
    if failed is None:
        return result
    if error is not None and _describe(error) == failed:
        raise error
    _raise(failed)
    raise AssertionError("unreachable")
