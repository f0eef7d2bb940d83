"""Evaluation during training, feeding a stopping rule: :class:`StoppingCallback`, a
``transformers.TrainerCallback`` (it does not import the training loop)."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from fastunlearn._io import atomic_file, write_json
from fastunlearn.engines import distributed
from fastunlearn.engines.distributed import gathered
from fastunlearn.evaluation.sets import SetEvaluator
from fastunlearn.evaluation.stopping import StoppingController, StopRule, parse_eval_every
from fastunlearn.evaluation.trajectory import Trajectory, plot_trajectory

# Beside each Trainer checkpoint of a run that evaluates during training (StoppingCallback.on_save).
RECORD_FILE = "stopping.json"
SNAPSHOT_FILE = "stopping_snapshot.safetensors"


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train (the adapters: small). Under ZeRO-3 each is gathered
    whole, one at a time (a collective: every rank keeps a state at the same evaluations); under FSDP2
    a parameter is a ``DTensor``, and its copy is this rank's shard."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with gathered([param]):
                state[name] = param.detach().to("cpu", copy=True)
    return state


def measure_reference(rule: StopRule, evaluator: SetEvaluator, model: torch.nn.Module) -> StopRule:
    """``rule`` resolved with its reference values measured on ``model`` (the model before unlearning,
    or the retain-only / retrained one, sharing the tokenizer) by ``evaluator``."""
    if rule.resolved:
        return rule
    return rule.with_reference(evaluator.evaluate(model, rule.reference_metrics))


class StoppingCallback(TrainerCallback):
    """Evaluate during training, stop by a rule, keep the chosen state, write the trajectory.

    The model at ``on_train_begin`` is the baseline (step 0); then every ``every`` optimiser steps (or
    each ``"epoch"``, and the final step) the controller's ``metrics_to_compute`` is followed until it
    asks for nothing. States the controller may restore are copied to the CPU and the chosen one is put
    back at ``on_train_end``. Every rank runs the callback and gets the main process's numbers, so all
    decide alike; the main process alone writes files (``trajectory.csv``, ``.png``).
    """

    def __init__(
        self,
        controller: StoppingController,
        evaluator: SetEvaluator,
        *,
        every: int | str = "epoch",
        output_dir: str | os.PathLike | None = None,
        plot: bool = True,
    ) -> None:
        self.every = parse_eval_every(every)
        self.controller, self.evaluator, self.plot = controller, evaluator, plot
        rule = controller.rule
        needed = set(controller.baseline_metrics())
        if rule is not None and not rule.resolved:
            if rule.reference_source != "model":
                raise ValueError(
                    f"the {rule.name} rule's reference values come from another model: measure them "
                    "first (measure_reference with the reference model)"
                )
            needed.update(rule.reference_metrics)
        missing = sorted(needed - evaluator.available)
        if missing:
            raise ValueError(
                f"the evaluator cannot compute {missing} on this data; "
                f"available: {sorted(evaluator.available)}"
            )
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        csv_path = None if self.output_dir is None else os.path.join(self.output_dir, "trajectory.csv")
        self.trajectory = Trajectory(csv_path)
        self.summary: dict[str, Any] = {}
        self._snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        # Seconds of the reference and baseline, of evaluation, and of training before this process
        # started (a resumed run); training time is wall time since _train_start less evaluation.
        self._seconds = {"setup_s": 0.0, "eval_s": 0.0, "train_s": 0.0}
        self._train_start: float | None = None
        self._eval_at_start = 0.0
        self._resumed = False

    @staticmethod
    def _losses(logs: Mapping[str, Any]) -> dict[str, float]:
        return {k: logs[k] for k in ("loss", "forget_loss", "retain_loss") if k in logs}

    def _row(self, state, values: Mapping[str, float], seconds: float, **extra: Any) -> None:
        """One trajectory row, with the loss already logged at this step (else :meth:`on_log` adds it)."""
        logged = {}
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            if "loss" in entry:
                logged = self._losses(entry)
                break
        step, epoch = int(state.global_step), float(state.epoch or 0.0)
        self.trajectory.append(
            {"step": step, "epoch": epoch, **values, **logged, **extra, "eval_s": round(seconds, 4)}
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        start = time.perf_counter()
        if not distributed.is_main():  # the main process alone writes the trajectory (csv and png)
            self.trajectory.path = None  # asked now: a launcher's process group may start after __init__
        if self._resumed:  # the baseline and the evaluations up to the checkpoint come from the record
            self.trajectory.write()
            self._train_start, self._eval_at_start = time.perf_counter(), self._seconds["eval_s"]
            return
        controller = self.controller
        if controller.rule is not None:
            controller.rule = measure_reference(controller.rule, self.evaluator, model)
        baseline = self.evaluator.evaluate(model, controller.baseline_metrics())
        controller.set_baseline(baseline)
        extra: dict[str, Any] = {}
        if controller.rule is not None:
            extra["satisfied"] = bool(controller.rule.satisfied(baseline))
            if extra["satisfied"] and distributed.is_main():
                warnings.warn(
                    f"the model satisfies the stopping rule ({controller.rule}) before unlearning: "
                    "training stops at the first evaluation",
                    stacklevel=2,
                )
        self._seconds["setup_s"] = time.perf_counter() - start
        self._row(state, baseline, self._seconds["setup_s"], **extra)
        self._train_start = time.perf_counter()

    def _evaluate(self, state, control, model) -> None:
        history = self.controller.history
        if model is None or (history and history[-1].step == state.global_step):
            return
        start, values = time.perf_counter(), {}
        while todo := self.controller.metrics_to_compute(values):
            values.update(self.evaluator.evaluate(model, todo))
        final = state.global_step >= state.max_steps
        decision = self.controller.record(state.global_step, state.epoch or 0.0, values, final=final)
        if decision.keep_state:
            self._snapshot = (int(state.global_step), _trainable_state(model))
        seconds = time.perf_counter() - start
        self._seconds["eval_s"] += seconds
        extra: dict[str, Any] = {} if self.controller.rule is None else {"satisfied": decision.satisfied}
        if (score := self.controller.history[-1].score) is not None:
            extra["retain_score"] = score
        self._row(state, values, seconds, **extra)
        # The trainer then logs the mean training loss since its previous log, at this very step.
        control.should_log = True
        control.should_training_stop = control.should_training_stop or decision.stop

    def on_log(self, args, state, control, logs=None, **kwargs):
        last = self.trajectory.rows[-1] if self.trajectory.rows else {}
        if logs and "loss" in logs and last.get("step") == state.global_step and "loss" not in last:
            self.trajectory.update_last(self._losses(logs))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "epoch" and (
            state.global_step % self.every == 0 or state.global_step >= state.max_steps
        ):
            self._evaluate(state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch":
            self._evaluate(state, control, model)

    def on_save(self, args, state, control, **kwargs):
        """Beside each checkpoint, what :meth:`resume_from` needs: the controller's record, the
        trajectory's rows, the state kept for a restore and the seconds spent so far."""
        if self.controller.stopped is not None or not distributed.is_main():
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        record = {
            "controller": self.controller.state_dict(),
            "trajectory": self.trajectory.rows,
            **self._seconds,
            "train_s": self._train_seconds(),
            "snapshot_step": None if self._snapshot is None else self._snapshot[0],
        }
        if self._snapshot is not None:
            from safetensors.torch import save_file

            atomic_file(os.path.join(folder, SNAPSHOT_FILE), lambda tmp: save_file(self._snapshot[1], tmp))
        write_json(os.path.join(folder, RECORD_FILE), record)

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Continue from the record :meth:`on_save` wrote beside ``checkpoint`` (call before training)."""
        path = os.path.join(os.fspath(checkpoint), RECORD_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"cannot resume: {checkpoint} holds no stopping record ({RECORD_FILE}); the run was "
                "interrupted after it stopped or was started without this rule"
            )
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        self.controller.load_state_dict(record["controller"])
        self.trajectory.rows = [dict(row) for row in record["trajectory"]]
        self._seconds = {key: record[key] for key in self._seconds}
        self._snapshot = None
        if record["snapshot_step"] is not None:
            from safetensors.torch import load_file

            self._snapshot = (record["snapshot_step"], load_file(os.path.join(checkpoint, SNAPSHOT_FILE)))
        self._resumed = True

    def _train_seconds(self) -> float:
        """Seconds training (evaluation excluded), before an interruption included."""
        if self._train_start is None:
            return self._seconds["train_s"]
        evaluating = self._seconds["eval_s"] - self._eval_at_start
        return self._seconds["train_s"] + time.perf_counter() - self._train_start - evaluating

    def on_train_end(self, args, state, control, model=None, **kwargs):
        train_seconds = self._train_seconds()
        target = self.controller.restore_target
        if target is not None and model is not None:
            if self._snapshot is None or self._snapshot[0] != target.step:
                raise RuntimeError(f"no saved state for step {target.step} to restore")  # a bug, not input
            params = dict(model.named_parameters())
            with torch.no_grad():  # under ZeRO-3 through a gather that DeepSpeed partitions back on exit
                for name, value in self._snapshot[1].items():
                    with gathered([params[name]], modifier_rank=0):
                        params[name].copy_(value.to(params[name].device))
        self._snapshot = None
        summary, rule = self.controller.summary(), self.controller.rule
        plot_path = None
        if self.plot and self.trajectory.path is not None and self.trajectory.rows:
            marks = {
                "rule first holds": summary["first_satisfied_step"],
                "stopped": summary["stopped_step"],
                "kept": summary["kept_step"] if summary["restored"] else None,
            }
            plot_path = os.path.join(self.output_dir, "trajectory.png")
            bounds, title = ((), None) if rule is None else (rule.bounds, str(rule))
            plot_trajectory(self.trajectory.rows, plot_path, bounds=bounds, marks=marks, title=title)
        eval_s = self._seconds["eval_s"]
        self.summary = {
            **summary,
            "eval_items": {name: len(ex) for name, ex in self.evaluator.sets.items()},
            "reference_and_baseline_eval_s": self._seconds["setup_s"],
            "eval_s": eval_s,
            "train_s": train_seconds,
            "eval_fraction": eval_s / train_seconds if train_seconds > 0 else None,
            "trajectory_csv": self.trajectory.path,
            "trajectory_png": plot_path,
        }
