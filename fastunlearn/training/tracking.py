"""Experiment trackers (TensorBoard, Weights & Biases, trackio) on a run: TensorBoard writes to
``OUTPUT/logs``, and every evaluation during training is logged at its step as ``eval/<metric>``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import Trainer, TrainerCallback

__all__ = ["LOGS_DIR", "connect_trackers"]

LOGS_DIR = "logs"  # TensorBoard's event files, inside the output directory
# Trajectory columns that are not evaluation results: the step itself, and the loss Trainer logs anyway.
_NOT_LOGGED = frozenset({"step", "epoch", "loss", "forget_loss", "retain_loss", "eval_s"})


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation row as tracker scalars: ``eval_<name>`` (shown as ``eval/<name>``), booleans 0/1."""
    return {
        f"eval_{name}": float(value)
        for name, value in row.items()
        if name not in _NOT_LOGGED and isinstance(value, (int, float))
    }


class _EvaluationLog(TrainerCallback):
    """Log each new evaluation row at its step (after the callback that evaluates, which runs first)."""

    def __init__(self, trainer: Trainer, trajectory: Any) -> None:
        self.trainer, self.trajectory = trainer, trajectory
        self.logged = 0

    def _log_new(self, state, control) -> None:
        rows = self.trajectory.rows
        for row in rows[self.logged :]:
            # A resumed run's earlier rows were logged by the run that evaluated them.
            if row["step"] == state.global_step:
                scalars = _scalars(row)
                # Trainer stops at its last step anyway; before it, a stop is the rule's.
                if control.should_training_stop and 0 < state.global_step < state.max_steps:
                    scalars["eval_stopped"] = 1.0
                should_log = control.should_log  # Trainer.log clears it: the step's loss is still due
                self.trainer.log(scalars)
                control.should_log = should_log
        self.logged = len(rows)

    def on_train_begin(self, args, state, control, **kwargs):
        self._log_new(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        self._log_new(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._log_new(state, control)


def connect_trackers(trainer: Trainer, build_dir: str, trajectory: Any = None) -> None:
    """Point TensorBoard at ``build_dir/logs`` and log the rows of ``trajectory`` as they are added."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(build_dir, LOGS_DIR)
    if trajectory is not None:
        trainer.add_callback(_EvaluationLog(trainer, trajectory))
