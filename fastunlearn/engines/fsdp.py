"""Fully sharded data parallel training of LoRA / FILA runs: torch's FSDP2 ``fully_shard``.

``unlearn(..., fsdp="full_shard auto_wrap")`` (``fastunlearn unlearn --fsdp "full_shard auto_wrap"``
under ``torchrun`` / ``accelerate launch``) shards the model's parameters, gradients and optimizer
states over the ranks for training. The option's words are ``transformers``' ``--fsdp`` words:

- ``full_shard`` (default) or ``shard_grad_op``: parameters gathered for each unit's forward and
  backward and freed after each (ZeRO-3), or kept gathered from the forward to the backward (ZeRO-2);
- ``auto_wrap``: one FSDP unit per transformer block (the model's ``_no_split_modules`` classes) and
  one for the rest (embeddings, final norm, output head); without it the whole model is one unit,
  gathered whole for every step;
- ``offload``: sharded parameters, gradients and optimizer states on the CPU (CUDA runs).

Why our own ``fully_shard`` rather than ``TrainingArguments(fsdp=...)``. ``transformers`` hands that
option to ``accelerate``, whose FSDP plugin is honoured only on accelerator devices: on CPU ranks
``accelerate`` sets up ``MULTI_CPU`` and wraps the model in DDP, silently. Sharding the model here
works the same on GPUs and on CPU ranks over gloo (so it is tested on every machine), and FSDP2 keeps
every parameter a ``DTensor`` under its own name, which is what FSDP1's ``use_orig_params=True``
exists to give ``peft``: the LoRA parameters stay individually trainable and named, no flat
parameters, no ``_fsdp_wrapped_module.`` in any name. ``Trainer`` then receives the sharded model
behind :class:`ShardedTrainingView`, a module it and ``accelerate`` take as already wrapped (no DDP on
top); the view applies the run's autocast and defers FSDP's gradient reduction to the last
micro-batch of an accumulation window (``no_sync``).

Order of a run (:func:`fastunlearn.training.run.unlearn`). The model is loaded, wrapped with LoRA, its
Fisher passes run and FILA initialises the adapters — all *before* sharding, so at that point each
rank holds the whole model (FSDP lowers the training peak, not the loading peak). The Fisher hooks
(:mod:`fastunlearn.fisher.passes`) fold only layer inputs ``X`` and output gradients ``G``, never a
weight's values (their accumulators take its shape and device, which a ``DTensor`` shard reports as
the full weight's), so they are exact on a sharded model too (tested with equal batch counts per
rank); they run before sharding because the passes give the ranks different numbers of batches and
a sharded forward is a collective every rank must join, and because FILA factorises each full base
weight.

Saving. Each parameter is a shard; :func:`gathered_state` gathers the tensors an export needs one at a
time (``DTensor.full_tensor()``, a collective every rank joins in the same order) into the main
process's CPU memory: the trainable (LoRA) tensors for the adapter, every tensor for the merged model.
The adapter and merged exports (:mod:`fastunlearn.fisher.export`) then run on the main process from
that state, under the names of the plain ``peft`` model (:func:`fastunlearn.models.loading.strip_wrappers`),
so the adapter loads with ``peft.PeftModel.from_pretrained`` on the original base.

Evaluation. A sharded forward is a collective, so the sharded model is evaluated (``metrics.json``'s
``after``, and the stopping rules' evaluations during training) by every rank on the same batches;
an evaluation that split its items between the ranks would have to give every rank as many forwards.
Greedy decoding stops when every rank's rows have (:func:`fastunlearn.evaluation.decoding.greedy_decode`),
and a state the stopping rule may restore is kept as each rank's own shards (its DTensors' copies).

Not built: ``init="full"`` (full fine-tuning), Trainer checkpoints and ``resume`` (the optimizer
state is sharded), ``hybrid_shard`` (a 2-D device mesh).
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
from fastunlearn.models.devices import training_device
from fastunlearn.models.naming import strip_wrappers, unwrap_model
from fastunlearn.models.precision import autocast

SHARDING = ("full_shard", "shard_grad_op")
FSDP_WORDS = (*SHARDING, "auto_wrap", "offload")

__all__ = [
    "FSDP_WORDS",
    "FsdpPlan",
    "ShardedTrainingView",
    "check_fsdp_run",
    "check_single_engine",
    "gathered_state",
    "parse_fsdp",
    "shard_model",
]


@dataclass(frozen=True)
class FsdpPlan:
    """What an ``fsdp`` option asks for (module docstring)."""

    reshard_after_forward: bool  # full_shard: True; shard_grad_op: False
    auto_wrap: bool
    offload: bool


def parse_fsdp(spec: str) -> FsdpPlan:
    """The plan of an ``fsdp`` option: space- (or comma-) separated words of :data:`FSDP_WORDS`.

    ``ValueError`` in one line for an unknown word, a repeated one, or both sharding strategies.
    """
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
    """Refuse two sharding engines in one run: each is given by its option's value (``None``/empty: off),
    e.g. ``check_single_engine(fsdp=cfg.fsdp, deepspeed=cfg.deepspeed)``."""
    chosen = [name for name, value in engines.items() if value]
    if len(chosen) > 1:
        raise ValueError(
            f"{' and '.join(chosen)} exclude each other: each shards the model its own way; pass one"
        )


def check_fsdp_run(spec: str, init: str, *, resume: bool) -> FsdpPlan:
    """The plan of ``fsdp=spec`` if this run can carry it out; else ``ValueError`` in one line, raised
    before the model loads: a run on one process, what FSDP runs do not support (module docstring),
    ``offload`` on CPU processes (its shards would be pinned for a device there is none of), or a
    PyTorch without ``fully_shard``."""
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
    if not _has_fully_shard():
        raise ValueError(
            f"fsdp needs torch.distributed.fsdp.fully_shard (PyTorch 2.6+), not in {torch.__version__}"
        )
    if not distributed.is_distributed():
        raise ValueError(
            "fsdp shards the model over several processes, but this run has one: start it with "
            "torchrun --nproc_per_node N or accelerate launch, or drop fsdp"
        )
    return plan


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (instances of its ``_no_split_modules`` classes)."""
    names = set(getattr(unwrap_model(model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, plan: FsdpPlan) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to ``model`` in place (per :class:`FsdpPlan`) and return it.

    Its parameters become ``DTensor`` shards of the full ones (dim 0 over the ranks); their names and
    ``requires_grad`` flags are kept. Call after the Fisher passes and FILA (module docstring).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": plan.reshard_after_forward}
    if plan.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if plan.auto_wrap:
        blocks = _blocks(model)
        if not blocks:
            raise ValueError(
                f"fsdp auto_wrap: {type(unwrap_model(model)).__name__} names no transformer blocks "
                "(_no_split_modules); drop auto_wrap to shard it as one unit"
            )
        for block in blocks:
            fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


class ShardedTrainingView(nn.Module):
    """What ``Trainer`` trains under FSDP: the sharded model behind a module that ``Trainer`` and
    ``accelerate`` do not wrap again (``Trainer._wrap_model`` hands it over; only the optimizer is then
    prepared). Its forward is the model's under the run's autocast (what ``accelerate`` adds to a model
    it prepares); its ``no_sync`` (called by ``accelerate`` for every micro-batch but an accumulation
    window's last) lets the gradients accumulate unreduced until the last one."""

    def __init__(self, sharded: nn.Module, precision: str, device: torch.device) -> None:
        super().__init__()
        self.module = sharded
        self.precision = precision
        self.compute_device = device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.precision, self.compute_device):
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def gathered_state(model: nn.Module, *, trainable_only: bool) -> dict[str, Tensor]:
    """``model``'s state as full tensors on the main process's CPU (``{}`` on the other ranks), under the
    plain model's names. A collective: every rank calls it. ``trainable_only``: only the parameters that
    require grad (the adapter), else every tensor (the merged model).

    One tensor is gathered at a time, so besides the result a rank holds at most one full tensor.
    """
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


class FsdpEngine(Engine):
    """FSDP2: the model sharded after FILA (the Fisher passes see it whole) and trained as it is."""

    name = "fsdp"

    def __init__(self, plan: FsdpPlan) -> None:
        self.plan = plan
        self.sharded = False

    @classmethod
    def for_run(cls, spec: str, init: str, *, resume: bool) -> FsdpEngine:
        return cls(check_fsdp_run(spec, init, resume=resume))

    def wrap(self, model: nn.Module, precision: str) -> nn.Module:
        shard_model(model, self.plan)
        self.sharded = True
        return ShardedTrainingView(model, precision, training_device())

    def gathered_state(self, model: nn.Module, *, trainable_only: bool) -> dict[str, Tensor]:
        return gathered_state(model, trainable_only=trainable_only)
