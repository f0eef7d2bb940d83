"""The options of ``fastunlearn demo`` beyond the run's own (method, init, seed, output...)."""

from __future__ import annotations

from dataclasses import dataclass

from fastunlearn.options.schema import Validated, option

DEMO_SIZES = ("small", "tiny")


@dataclass
class DemoOptions(Validated):
    """The synthetic data and models of the demo, and its stopping rule."""

    cache_dir: str | None = option(
        None, "where the data and pre-trained demo models are cached (default: the user cache)", path=True
    )
    size: str = option("small", "'tiny' is a reduced, faster demo used by the tests", choices=DEMO_SIZES)
    stop: bool = option(False, "stop by the tofu rule instead of after 10 epochs")
