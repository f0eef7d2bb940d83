"""The options of ``fastunlearn plan`` beyond the run's own (the fields of
:class:`~fastunlearn.options.unlearn.UnlearnConfig` marked as plan inputs)."""

from __future__ import annotations

from dataclasses import dataclass

from fastunlearn.engines.base import ENGINES
from fastunlearn.options.schema import option, validate

__all__ = ["PlanOptions"]


@dataclass
class PlanOptions:
    """How the plan is made and shown."""

    world_size: int = option(1, "devices", positive=True)
    engine: str = option("ddp", "how the devices share the model", choices=ENGINES)
    terms: bool = option(False, "list each phase's terms under its row")
    json: bool = option(False, "print the plan as JSON")

    def __post_init__(self) -> None:
        validate(self)
