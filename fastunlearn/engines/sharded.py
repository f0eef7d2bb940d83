"""Parameters partitioned across ranks (DeepSpeed ZeRO-3): true shapes, and gathering one module at a time.

Under ZeRO-3 a rank's ``layer.weight`` is empty (``shape == (0,)``) and the whole tensor exists only
inside ``deepspeed.zero.GatheredParameters`` or the module's own forward and backward. So shapes come
from the module (:func:`linear_shape`), and code that reads or writes whole weights (FILA, the exports)
wraps one module at a time in :func:`gathered`. Without partitioned parameters everything here is a
no-op, so the same code runs in one process, under DDP and under ZeRO-0/1/2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn


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
