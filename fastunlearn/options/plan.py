"""The options of ``fastunlearn plan`` beyond the run's own plan inputs."""

from __future__ import annotations

from dataclasses import dataclass

from fastunlearn.engines.base import ENGINES
from fastunlearn.options.schema import Validated, option


@dataclass
class PlanOptions(Validated):
    """Where the run is planned and how the plan is shown."""

    device: str = option("cuda", "the kind of device the run trains on", choices=("cuda", "cpu"))
    world_size: int = option(1, "devices", positive=True)
    engine: str = option("ddp", "how the devices share the model (fsdp, zero3: sharded)", choices=ENGINES)
    terms: bool = option(False, "list each phase's bytes by kind under its row")
    json: bool = option(False, "print the plan as JSON")
