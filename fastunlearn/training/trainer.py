"""The unlearning loop on ``transformers.Trainer``: paired forget/retain batches, the run's objective as
the loss, and Cha et al.'s (ICLR 2025) schedule: linear warm-up, then linear decay. The trackers of
``report_to`` get the training scalars and every evaluation during training at its step (``eval/<metric>``);
TensorBoard writes to ``OUTPUT/logs``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from fastunlearn import data as fdata
from fastunlearn._io import write_json
from fastunlearn.engines import distributed
from fastunlearn.methods.objectives import Objective
from fastunlearn.models.devices import training_device
from fastunlearn.options.unlearn import UnlearnConfig

RUN_LOSS_FILE = "run_loss.json"  # beside each checkpoint: the loss summed over the steps before it
LOGS_DIR = "logs"  # TensorBoard's event files, inside the output directory
# Trajectory columns that are not evaluation results: the step itself, and the loss Trainer logs anyway.
_NOT_LOGGED = frozenset({"step", "epoch", "loss", "forget_loss", "retain_loss", "eval_s"})


class _EvaluationLog(TrainerCallback):
    """Log each new evaluation row at its step (after the callback that evaluates, which runs first)."""

    def __init__(self, trainer: Trainer, trajectory: Any) -> None:
        self.trainer, self.trajectory = trainer, trajectory
        self.logged = 0

    def on_step_end(self, args, state, control, **kwargs) -> None:
        rows = self.trajectory.rows
        for row in rows[self.logged :]:
            # A resumed run's earlier rows were logged by the run that evaluated them.
            if row["step"] == state.global_step:
                # tracker scalars: eval_<name> (shown as eval/<name>), booleans 0/1
                scalars = {
                    f"eval_{k}": float(v)
                    for k, v in row.items()
                    if k not in _NOT_LOGGED and isinstance(v, (int, float))
                }
                # Trainer stops at its last step anyway; before it, a stop is the rule's.
                if control.should_training_stop and 0 < state.global_step < state.max_steps:
                    scalars["eval_stopped"] = 1.0
                should_log = control.should_log  # Trainer.log clears it: the step's loss is still due
                self.trainer.log(scalars)
                control.should_log = should_log
        self.logged = len(rows)

    on_train_begin = on_epoch_end = on_step_end


class _EpochPairing(TrainerCallback):
    """Re-draw the forget/retain pairing at the start of each epoch (also after a resume mid-epoch)."""

    def __init__(self, dataset: fdata.PairedDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        # state.epoch is e + (steps done)/(steps per epoch): its floor is the epoch index e.
        self.dataset.set_epoch(math.floor(state.epoch or 0))


class UnlearnTrainer(Trainer):
    """``Trainer`` on paired forget/retain batches with an unlearning objective.

    The model must be patched (:func:`fastunlearn.patch`): the objective's terms are computed by the
    call of the model ``Trainer`` hands over, so its wrappers' hooks and autocast apply to the loss.
    The forget and retain parts are averaged between logging steps as ``forget_loss``, ``retain_loss``.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: Objective, wrapped_model: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.wrapped_model = wrapped_model
        self._parts: dict[str, torch.Tensor] = {}
        self._parts_n = 0
        # The run's loss over every optimiser step, a resumed run's earlier steps included
        # (resume_run_loss restores them): Trainer's own training_loss covers this call's steps only.
        self._loss_sum: torch.Tensor | float = 0.0
        self._earlier_loss_sum = 0.0
        if isinstance(self.train_dataset, fdata.PairedDataset):
            self.add_callback(_EpochPairing(self.train_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, parts = self.objective(model, inputs)
        self._loss_sum = self._loss_sum + loss.detach() / self.args.gradient_accumulation_steps
        for key, value in parts.items():
            self._parts[key] = self._parts.get(key, 0) + value
        self._parts_n += 1
        return (loss, None) if return_outputs else loss

    def _wrap_model(self, model, training=True, dataloader=None):
        # An engine that wrapped the model itself (FSDP: fastunlearn.engines.fsdp) hands its wrapper
        # over; a wrapper that is not `self.model` makes Trainer prepare only the optimizer.
        if training and self.wrapped_model is not None:
            return self.wrapped_model
        return super()._wrap_model(model, training, dataloader)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            write_json(os.path.join(folder, RUN_LOSS_FILE), {"loss_sum": self._run_loss_sum()})

    def resume_run_loss(self, checkpoint: str) -> None:
        """Take the loss of the steps before ``checkpoint`` from it (the run resumes there)."""
        path = os.path.join(checkpoint, RUN_LOSS_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                self._earlier_loss_sum = float(json.load(handle)["loss_sum"])

    def _run_loss_sum(self) -> float:
        return self._earlier_loss_sum + float(self._loss_sum)

    def run_loss(self) -> float:
        """The mean loss per optimiser step over the whole run, averaged over the ranks."""
        return distributed.mean(self._run_loss_sum() / max(self.state.global_step, 1))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._parts_n:
            for key, value in self._parts.items():
                logs[key] = round(float(value) / self._parts_n, 4)  # one sync per logging step
            self._parts, self._parts_n = {}, 0
        super().log(logs, *args, **kwargs)


def build_trainer(
    model: nn.Module,
    dataset: fdata.PairedDataset,
    pad_id: int,
    *,
    objective: Objective,
    cfg: UnlearnConfig,
    output_dir: str,
    precision: str = "fp32",
    extra_callbacks: Sequence[TrainerCallback] = (),
    wrapped_model: nn.Module | None = None,
    deepspeed: dict | None = None,
    trajectory: Any = None,
):
    """An :class:`UnlearnTrainer` for a patched ``model`` in the resolved ``precision`` (fp16: loss-scaled).

    ``wrapped_model``: ``model`` as an engine wrapped it (FSDP), trained without checkpoints (its
    optimizer state is sharded); ``deepspeed``: a checked DeepSpeed config. ``cfg.report_to``'s trackers
    receive the training scalars and each row added to ``trajectory``.
    """
    # Under torchrun each of the W ranks takes its own batch: a step consumes W·batch_size pairs.
    batches_per_epoch = math.ceil(len(dataset) / (cfg.batch_size * distributed.world_size()))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    # trackio's project and Space from its own variables, as wandb's are: transformers reads
    # WANDB_PROJECT itself but takes trackio's from TrainingArguments (newer versions' fields).
    trackio = {"project": "TRACKIO_PROJECT", "trackio_space_id": "TRACKIO_SPACE_ID"}
    trackio = {field: os.environ.get(variable) for field, variable in trackio.items()}
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type="linear",
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        optim="adamw_torch",
        bf16=precision == "bf16",
        fp16=precision == "fp16",  # with accelerate's GradScaler (loss scaling)
        # Without it, bf16 on CPU is refused as "no GPU"; with it, DeepSpeed is not used (its CPU
        # accelerator runs DeepSpeed without use_cpu).
        use_cpu=training_device().type == "cpu" and deepspeed is None,
        deepspeed=deepspeed,
        logging_steps=cfg.logging_steps,
        save_strategy="epoch" if wrapped_model is None else "no",
        save_total_limit=1,
        report_to="none" if cfg.report_to == ["none"] else list(cfg.report_to),
        run_name=cfg.run_name or os.path.basename(os.path.abspath(os.fspath(cfg.output_dir or output_dir))),
        **{k: v for k, v in trackio.items() if v and k in TrainingArguments.__dataclass_fields__},
        seed=cfg.seed,
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Only the adapter trains: DDP need not search the graph for parameters without gradients.
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if distributed.is_distributed() and not torch.cuda.is_available() else None,
    )
    trainer = UnlearnTrainer(
        model=model, args=args, callbacks=[*(cfg.callbacks or ()), *extra_callbacks], train_dataset=dataset,
        data_collator=fdata.PairCollator(pad_id), objective=objective, wrapped_model=wrapped_model,
    )  # fmt: skip
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:  # TensorBoard writes to OUTPUT/logs
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(output_dir, LOGS_DIR)
    if trajectory is not None:
        trainer.add_callback(_EvaluationLog(trainer, trajectory))
    return trainer
