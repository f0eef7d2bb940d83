"""A run that crashes after its first checkpoint: the input of every resume test."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fastunlearn.training.trainer import UnlearnTrainer


def crash_after_the_first_checkpoint(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> None:
    """``run()`` (a 2-epoch run of 2 steps an epoch) crashing in its second epoch, after the checkpoint
    of the first (step 2) is written; ``UnlearnTrainer`` is restored afterwards."""
    original = UnlearnTrainer.compute_loss

    def crash_in_second_epoch(self, *args, **kw):
        if self.state.global_step >= 2:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kw)

    monkeypatch.setattr(UnlearnTrainer, "compute_loss", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run()
    monkeypatch.setattr(UnlearnTrainer, "compute_loss", original)
