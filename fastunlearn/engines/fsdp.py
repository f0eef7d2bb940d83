"""LoRA / FILA runs sharded with torch's FSDP2 ``fully_shard``, taking ``transformers``' ``--fsdp``
words: ``full_shard`` (default, ZeRO-3-like), ``shard_grad_op`` (ZeRO-2-like), ``auto_wrap`` (a unit per
transformer block), ``offload`` (CPU shards and optimizer state; CUDA runs).

Ours rather than ``TrainingArguments(fsdp=...)``, which accelerate silently turns into DDP on CPU ranks;
FSDP2 keeps peft's LoRA parameters named, individually trainable ``DTensor``s. The model is sharded after
the Fisher passes and FILA (uneven batches per rank; FILA factorises whole weights). Not supported:
``init="full"``, ``resume`` (sharded optimizer state), ``hybrid_shard``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastunlearn.engines import distributed
from fastunlearn.engines.base import Engine
from fastunlearn.models.devices import AutocastEachCall, training_device
from fastunlearn.models.naming import strip_wrappers, unwrap_model

SHARDING = ("full_shard", "shard_grad_op")
FSDP_WORDS = (*SHARDING, "auto_wrap", "offload")


@dataclass(frozen=True)
class FsdpPlan:
    """What an ``fsdp`` option asks for (module docstring)."""

    reshard_after_forward: bool  # full_shard: True; shard_grad_op: False
    auto_wrap: bool
    offload: bool


def parse_fsdp(spec: str) -> FsdpPlan:
    """The plan of an ``fsdp`` option: space- (or comma-) separated words of :data:`FSDP_WORDS`."""
    if not isinstance(spec, str):
        raise ValueError(f"fsdp must be a string of words from {list(FSDP_WORDS)}, got {spec!r}")
    words = spec.replace(",", " ").split()
    if not words:
        raise ValueError(f"fsdp={spec!r} names no option; expected words from {list(FSDP_WORDS)}")
    unknown = [w for w in words if w not in FSDP_WORDS]
    if unknown:
        raise ValueError(
            f"fsdp={spec!r}: unknown word(s) {unknown}; expected words from {list(FSDP_WORDS)} "
            "(hybrid_shard and no_shard are not supported)"
        )
    if len(set(words)) != len(words):
        raise ValueError(f"fsdp={spec!r} repeats a word")
    sharding = [w for w in words if w in SHARDING]
    if len(sharding) > 1:
        raise ValueError(f"fsdp={spec!r}: full_shard and shard_grad_op exclude each other")
    return FsdpPlan(
        reshard_after_forward=sharding != ["shard_grad_op"],
        auto_wrap="auto_wrap" in words,
        offload="offload" in words,
    )


def check_single_engine(**engines: Any) -> None:
    """Refuse two sharding engines in one run (each given by its option's value; empty: off)."""
    chosen = [name for name, value in engines.items() if value]
    if len(chosen) > 1:
        raise ValueError(
            f"{' and '.join(chosen)} exclude each other: each shards the model its own way; pass one"
        )


def check_fsdp_run(spec: str, init: str, *, resume: bool) -> FsdpPlan:
    """The plan of ``fsdp=spec`` if this run can carry it out, else ``ValueError`` before the model loads."""
    plan = parse_fsdp(spec)
    if init == "full":
        raise ValueError(
            "fsdp shards LoRA / FILA runs; init='full' (full fine-tuning) is not supported with it"
        )
    if resume:
        raise ValueError(
            "resume=True is not supported with fsdp (its sharded optimizer state is not checkpointed)"
        )
    if plan.offload and training_device().type != "cuda":
        raise ValueError(f"fsdp {spec!r}: offload moves shards off a GPU to the CPU; this run has no GPU")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ValueError(
            f"fsdp needs torch.distributed.fsdp.fully_shard (PyTorch 2.6+), not in {torch.__version__}"
        ) from None
    if not distributed.is_distributed():
        raise ValueError(
            "fsdp shards the model over several processes, but this run has one: start it with "
            "torchrun --nproc_per_node N or accelerate launch, or drop fsdp"
        )
    return plan


def shard_model(model: nn.Module, plan: FsdpPlan) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to ``model`` in place and return it: its parameters become
    ``DTensor`` shards (dim 0 over the ranks) under the same names and ``requires_grad`` flags."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": plan.reshard_after_forward}
    if plan.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if plan.auto_wrap:
        names = set(getattr(unwrap_model(model), "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in names]  # the transformer blocks
        if not blocks:
            raise ValueError(
                f"fsdp auto_wrap: {type(unwrap_model(model)).__name__} names no transformer blocks "
                "(_no_split_modules); drop auto_wrap to shard it as one unit"
            )
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class ShardedTrainingView(AutocastEachCall):
    """The sharded model behind a module ``Trainer`` and ``accelerate`` do not wrap again: its forward
    runs under the run's autocast, and its ``no_sync`` (which ``accelerate`` calls for every micro-batch
    but an accumulation window's last) defers the gradients' reduction to the last."""

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


class FsdpEngine(Engine):
    """FSDP2: the model sharded after FILA (the Fisher passes see it whole) and trained as it is."""

    name = "fsdp"

    def __init__(self, plan: FsdpPlan) -> None:
        self.plan = plan

    def wrap(self, model: nn.Module, precision: str) -> nn.Module:
        return ShardedTrainingView(shard_model(model, self.plan), precision, training_device())

    def gathered_state(self, model: nn.Module, *, trainable_only: bool) -> dict[str, Tensor]:
        """``model``'s state as full tensors on the main process's CPU (``{}`` elsewhere) under the plain
        model's names, gathered one tensor at a time; a collective. ``trainable_only``: the adapter's."""
        from torch.distributed.tensor import DTensor

        # By stripped name: FSDP1 names parameters with `_fsdp_wrapped_module.` but not its state dict's keys.
        keep = {strip_wrappers(n) for n, p in model.named_parameters() if p.requires_grad}
        state: dict[str, Tensor] = {}
        for name, tensor in model.state_dict().items():
            key = strip_wrappers(name)
            if trainable_only and key not in keep:
                continue
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # every rank, same order
            if distributed.is_main():
                state[key] = full.detach().to("cpu", copy=True)
            del full
        return state
