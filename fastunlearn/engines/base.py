"""One interface for every way a run is spread over devices, and the choice among them.

The pipeline calls an :class:`Engine`'s hooks in order, knowing nothing of the engines: ``loading``
around ``from_pretrained``, ``place``, ``before_training`` around every pass before ``Trainer`` starts,
``after_fisher`` between the Fisher passes and FILA, ``wrap`` after FILA, ``trainer_options`` for
``TrainingArguments``, ``gathered_state`` for the exports. One process and DDP need no hook.
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from fastunlearn.engines import distributed
from fastunlearn.models.devices import to_training_device

# What the memory plan and run_config.json call each engine.
ENGINES = ("ddp", "fsdp", "zero2", "zero3")


class Engine:
    """One process, or DDP replicas under ``torchrun`` / ``accelerate launch``."""

    name = "ddp"

    def loading(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def place(self, model: nn.Module) -> None:
        to_training_device(model)

    def before_training(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_fisher(self) -> None:
        """Called between the Fisher passes and FILA's writes into the weights."""

    def wrap(self, model: nn.Module, precision: str) -> nn.Module | None:
        """A model the engine prepared for training itself, or ``None`` for ``Trainer`` to wrap."""
        return None

    def trainer_options(self) -> dict[str, Any]:
        return {}

    def gathered_state(self, model: nn.Module, *, trainable_only: bool) -> dict | None:
        """The trained state collected on the main process, or ``None`` to read the model itself."""
        return None


def engine_for(
    fsdp: str | None, deepspeed: Any, *, init: str, resume: bool, cfg: Any, precision: str
) -> Engine:
    """The engine a run's options ask for, checked before anything loads: ``fsdp`` words or a
    ``deepspeed`` config (read and checked against the options on the main process)."""
    if fsdp:
        from fastunlearn.engines.fsdp import FsdpEngine, check_fsdp_run

        return FsdpEngine(check_fsdp_run(fsdp, init, resume=resume))
    if deepspeed is not None:
        from fastunlearn.engines.deepspeed import prepare_deepspeed

        return distributed.on_main(
            lambda: prepare_deepspeed(deepspeed, cfg, precision, distributed.world_size())
        )
    return Engine()
