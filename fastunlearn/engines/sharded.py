"""Parameters partitioned across ranks (DeepSpeed ZeRO-3): true shapes, and gathering one module at a time.

Under ZeRO-3 every parameter is split between the ranks (``deepspeed.zero.Init``, which
``transformers`` enters in ``from_pretrained`` while a ``HfDeepSpeedConfig`` is alive): a rank's
``layer.weight`` is an empty tensor (``shape == (0,)``), its slice lives in ``weight.ds_tensor``, and the
whole tensor exists only inside ``deepspeed.zero.GatheredParameters`` (or during the module's own
forward and backward, fetched by the engine's hooks). So:

- a layer's shape comes from the module (:func:`linear_shape`: ``out_features`` / ``in_features``),
  never from ``weight.shape``;
- code that reads or writes whole weights (FILA's SVD and residual, the adapter and merged exports)
  wraps each module in :func:`gathered` — a collective, so every rank must enter it — and, where it
  writes, names the rank whose values are kept (``modifier_rank=0``: DeepSpeed re-partitions rank 0's
  tensors on exit). One module at a time: a 70B model is never whole on one device.

Without DeepSpeed (or on parameters it does not own) :func:`gathered` is a no-op, so the same code
runs in one process, under DDP and under ZeRO-0/1/2. ``deepspeed`` is imported only when a partitioned
parameter is met (it is an optional extra).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

__all__ = ["gathered", "gathered_state_dict", "is_partitioned", "linear_shape"]


def is_partitioned(param: Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (DeepSpeed marks them with ``ds_id`` / ``ds_status``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear layer's weight, read from the module (``out_features`` /
    ``in_features``) so that it is right when the weight is partitioned away (module docstring)."""
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
    """Inside the block, every partitioned parameter of ``params`` is whole on every rank.

    ``modifier_rank=None``: read only (changes are discarded). ``modifier_rank=r``: rank ``r``'s values
    are partitioned back on exit, so writes must be the same on every rank or made on ``r``. A collective
    when any parameter is partitioned: every rank must enter it with the same parameters. A no-op
    otherwise.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    with _gather_context(partitioned, modifier_rank):
        yield


def gathered_state_dict(module: nn.Module, *, keep: bool = True) -> dict[str, Tensor]:
    """``module.state_dict()`` with every partitioned parameter gathered, one submodule at a time, and
    copied to the CPU (``keep=False``: gathered and dropped, for ranks that only take part in the
    collective). Peak device memory beyond the shards: the largest submodule's own parameters."""
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
