"""The few ``torch.distributed`` operations a run under ``torchrun`` / ``accelerate launch`` needs, and
DeepSpeed ZeRO-3's partitioned parameters; without a launcher (or partitioning) each is a no-op.

:func:`init_from_env` joins the launcher's process group (``nccl`` with CUDA, else ``gloo``). The main
process alone writes (:func:`on_main` hands its result or error to every rank, so no rank waits forever),
checks run everywhere (:func:`on_all`), items are split between the ranks (:func:`map_sharded`). Under
ZeRO-3 a rank's ``layer.weight`` is empty (``shape == (0,)``), whole only inside ``GatheredParameters``
or the module's own forward and backward: shapes come from the module (:func:`linear_shape`), and code
reading or writing whole weights (FILA, the exports) wraps one module at a time in :func:`gathered`.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group a launcher describes, if not joined yet; whether the run is distributed.
    ``ValueError`` in one line when ``WORLD_SIZE > 1`` but the group cannot be formed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    raw = os.environ.get("WORLD_SIZE", "1")  # a launcher's (1 without one)
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"environment variable WORLD_SIZE={raw!r} is not a positive integer")
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

    A gloo worker thread still freeing tensors when the interpreter finalizes aborts the process (exit
    -6); destroying the group joins those threads, but only if nothing else holds the group, and
    ``torch.distributed.nn`` binds it into default arguments when first imported. So it is imported
    here, before there is a group to bind.
    """
    import torch.distributed.nn as _binds_world_defaults  # noqa: F401

    dist.init_process_group(backend, **options)


def leave_group() -> None:
    """Destroy the process group, if there is one, at exit while the interpreter is whole."""
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
    values = _all_gather(float(value))
    return sum(values) / len(values)


def every_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on every rank: a decision ranks running collectives in step take together."""
    return all(_all_gather(bool(flag))) if is_distributed() else bool(flag)


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (it must pickle), in rank order."""
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, obj)
    return values


def broadcast_object(obj: T) -> T:
    """The main process's ``obj`` on every rank (it must pickle); ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)  # through the current CUDA device under NCCL
    return box[0]


def parameters_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are split between the ranks (FSDP, ZeRO-3): then every rank must run
    the same forwards in the same order."""
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
    """``fn(items)`` computed by the ranks together: each runs ``fn`` on its :func:`shard`, and the
    per-item results (a list, a tensor or a dict of tensors, by item along dimension 0) are gathered in
    item order on every rank, on the CPU. An error on any rank is raised on every rank (:func:`on_all`).
    When ``model``'s weights are split between the ranks, every rank runs ``fn`` on all the items.
    """
    if not is_distributed() or not items or (model is not None and parameters_sharded(model)):
        return fn(list(items))
    part = shard(items)
    local = on_all(lambda: _cpu(fn(part)) if part else None)
    return _in_item_order(_all_gather(local), len(items))


def _describe(err: BaseException) -> tuple[str, str]:
    """An error as (builtin exception name, message): what every rank can re-create."""
    for cls in type(err).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__, str(err)
    return "RuntimeError", str(err)


def _rebuilt(described: tuple[str, str]) -> BaseException:
    name, message = described
    return getattr(builtins, name, RuntimeError)(message)


def _attempt(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """``fn()``'s result, or the error it raised: handed to the other ranks, then re-raised."""
    try:
        return fn(), None
    except Exception as err:
        return None, err


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and return its result (it must pickle) on every rank; if it
    raises, every rank raises the same builtin exception type with the same message."""
    if not is_distributed():
        return fn()
    result, error = _attempt(fn) if is_main() else (None, None)
    outcome = broadcast_object(("error", _describe(error)) if error is not None else ("ok", result))
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise _rebuilt(outcome[1])
    return outcome[1]


def on_all(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised on any, every rank raises the lowest failing rank's error."""
    if not is_distributed():
        return fn()
    result, error = _attempt(fn)
    outcomes = _all_gather(None if error is None else _describe(error))
    failed = next((o for o in outcomes if o is not None), None)
    if failed is None:
        return result
    if error is not None and _describe(error) == failed:
        raise error
    raise _rebuilt(failed)


def is_partitioned(param: Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (DeepSpeed marks them with ``ds_id`` / ``ds_status``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear layer's weight, from ``out_features`` / ``in_features`` when it has them."""
    out_features, in_features = getattr(layer, "out_features", None), getattr(layer, "in_features", None)
    if isinstance(out_features, int) and isinstance(in_features, int):
        return out_features, in_features
    weight = layer.weight
    if weight.dim() != 2:
        raise ValueError(
            f"{type(layer).__name__} has no out_features/in_features and a weight of shape "
            f"{tuple(weight.shape)}; cannot tell its [out, in] shape"
        )
    return tuple(weight.shape)  # type: ignore[return-value]


def _gather_context(params: list[Tensor], modifier_rank: int | None) -> contextlib.AbstractContextManager:
    """DeepSpeed's ``GatheredParameters`` over ``params`` (looked up here so a test can stand in for it)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


@contextlib.contextmanager
def gathered(params: Iterable[Tensor], *, modifier_rank: int | None = None) -> Iterator[None]:
    """Inside the block, every partitioned parameter of ``params`` is whole on every rank (a collective;
    a no-op when none is). ``modifier_rank=r``: rank ``r``'s values are partitioned back on exit;
    ``None``: changes are discarded."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    with _gather_context(partitioned, modifier_rank):
        yield


def gathered_state_dict(module: nn.Module, *, keep: bool = True) -> dict[str, Tensor]:
    """``module.state_dict()`` on the CPU, gathered one submodule at a time (``keep=False``: only take
    part in the collective)."""
    state: dict[str, Any] = {}
    for prefix, sub in module.named_modules():
        own = dict(sub.named_parameters(recurse=False))
        with gathered(own.values()):
            if keep:
                for name, tensor in sub.state_dict(keep_vars=True).items():
                    if "." in name:  # a descendant's: taken when that module's turn comes
                        continue
                    state[f"{prefix}.{name}" if prefix else name] = tensor.detach().to("cpu", copy=True)
    return state if keep else {}
