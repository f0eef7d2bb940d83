"""Evaluation during training, on bounded subsets, feeding a stopping rule
(:mod:`fastunlearn.evaluation.stopping`).

- :class:`SubsetEvaluator` computes the metrics of :data:`~fastunlearn.evaluation.stopping.METRIC_NAMES`
  (and the unseen-text reference) on at most ``eval_items`` examples per set, with
  :mod:`fastunlearn.evaluation.metrics`: one teacher-forced pass over every set asked for at once
  gives ``prob`` / ``acc`` / ``nll`` / ``ma``; greedy generation, batched with a KV cache and left
  padding, gives ``rougeL`` and ``el10`` — and is run only for what is asked. The subsets are
  tokenised once and their padded batches, prompts and reference answers built once per run, so an
  evaluation is model calls and one transfer of its numbers to the host.
- :class:`StoppingCallback` is the ``transformers.TrainerCallback``: it evaluates the model before
  training and every N optimiser steps or every epoch (also sharded by FSDP2 or DeepSpeed ZeRO-3:
  every rank evaluates every item in step, and the states kept are gathered), asks the
  :class:`~fastunlearn.evaluation.stopping.StoppingController` what to compute and whether to stop,
  writes ``trajectory.csv``, keeps the trainable parameters of states it may restore (on the CPU,
  only when a restore may need them), puts the chosen state back when training ends and draws
  ``trajectory.png``.

Evaluation layer: this module does not import the training loop.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from fastunlearn import data as fdata
from fastunlearn._io import atomic_file, write_json
from fastunlearn.engines import distributed
from fastunlearn.engines.sharded import gathered
from fastunlearn.evaluation.decoding import greedy_completions
from fastunlearn.evaluation.extraction_metrics import extraction_likelihood
from fastunlearn.evaluation.likelihood import collect_answer_stats
from fastunlearn.evaluation.scores import rouge_l_recall
from fastunlearn.evaluation.stopping import (
    EL_N,
    StoppingController,
    StopRule,
    available_metrics,
    parse_eval_every,
)
from fastunlearn.evaluation.trajectory import Trajectory, plot_trajectory

__all__ = ["RECORD_FILE", "SNAPSHOT_FILE", "StoppingCallback", "SubsetEvaluator", "measure_reference"]

# Beside each Trainer checkpoint of a run that evaluates during training (StoppingCallback.on_save).
RECORD_FILE = "stopping.json"
SNAPSHOT_FILE = "stopping_snapshot.safetensors"

_TEACHER_FORCED = ("prob", "acc", "nll", "ma")
_STATS = ("nll_sum", "num_tokens", "correct")


def _spread(examples: Sequence[fdata.Example], k: int) -> list[fdata.Example]:
    """``k`` examples evenly spaced over the set (its first, then every ``len/k``-th): a subset that
    spans files sorted by topic (TOFU lists each author's questions together), with no randomness."""
    n = len(examples)
    return list(examples) if n <= k else [examples[(i * n) // k] for i in range(k)]


def _record_format(examples: Sequence[fdata.Example]) -> str:
    """``"text"`` when every token is labelled (raw text), ``"qa"`` when every example has an unlabelled
    prompt (question/answer or prompt/completion), else ``"mixed"``."""
    prompted = [ex.labels[0] == fdata.IGNORE_INDEX for ex in examples]
    return "qa" if all(prompted) else "text" if not any(prompted) else "mixed"


def _forced_metrics(
    nll_sum: torch.Tensor, tokens: torch.Tensor, correct: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The teacher-forced metrics of one subset from its per-example statistics (fp64, ``[N]`` each)."""
    mean_nll = nll_sum / tokens
    return {
        "prob": torch.exp(-mean_nll).mean(),
        "acc": correct.sum() / tokens.sum(),
        "nll": mean_nll.mean(),
        # Raw text labels every token: correct / tokens is Jang et al.'s MA of each sequence.
        "ma": (correct / tokens).mean(),
    }


class SubsetEvaluator:
    """The metrics of a run on bounded subsets of its forget / retain / unseen examples.

    ``forget``, ``retain``, ``unseen``: tokenised examples (:func:`fastunlearn.data.examples.prepare`,
    the same prompts as training); ``unseen`` must be raw text. Each set is cut to ``eval_items`` examples
    spread evenly over it (fixed for the run, so every evaluation and every reference value is
    measured on the same examples). ROUGE-L: the greedy answer to the training prompt against the
    labelled answer, up to ``min(max_new_tokens, 2 × the reference's tokens)`` new tokens — twice the
    reference leaves room for any rewording, and a collapsed model that never emits EOS does not
    decode to ``max_new_tokens``. The numbers are the subset means of :mod:`fastunlearn.evaluation.stopping`'s
    definitions: a rule decided here is decided on the subset.

    Cost: the teacher-forced metrics of every set asked for come from one pass over the sets' examples
    together, sorted by length into batches of ``batch_size`` (less padding than set by set; per
    example the result is the same up to the rounding of a different batch shape: right padding is
    masked and causal). Everything built from the examples (padded batches, prompts, decoded reference
    answers, generation budgets) is built on first use and reused by every later evaluation; an
    evaluation moves its numbers to the host once. The model runs in eval mode under ``torch.no_grad``,
    not ``torch.inference_mode``: the evaluation before training is the model's first forward, and a
    first forward in inference mode breaks FSDP's training forward afterwards (pytorch/pytorch#113203;
    FSDP2 unsharding, #197327), for no measured gain here (the same milliseconds on the demo's model).
    """

    def __init__(
        self,
        tokenizer: Any,
        forget: Sequence[fdata.Example],
        retain: Sequence[fdata.Example] | None = None,
        unseen: Sequence[fdata.Example] | None = None,
        *,
        eval_items: int = 32,
        batch_size: int = 16,
        max_new_tokens: int = 200,
    ) -> None:
        for name, value in (("eval_items", eval_items), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.tokenizer, self.batch_size, self.max_new_tokens = tokenizer, batch_size, max_new_tokens
        self.pad_id = fdata.pad_id_of(tokenizer)
        self.sets: dict[str, list[fdata.Example]] = {}
        for name, examples in (("forget", forget), ("retain", retain), ("unseen", unseen)):
            if examples:
                self.sets[name] = _spread(examples, eval_items)
        if "forget" not in self.sets:
            raise ValueError("the forget set is empty: there is nothing to evaluate")
        formats = {name: _record_format(examples) for name, examples in self.sets.items()}
        if formats.get("unseen", "text") != "text":
            raise ValueError('unseen text must be raw text ({"text"} records, every token labelled)')
        self.available = available_metrics(formats)
        # Built on first use, then reused: the subsets (and each process's share of them) are fixed
        # for the run.
        self._forced_inputs: dict[tuple, tuple[list[dict[str, torch.Tensor]], torch.Tensor]] = {}
        self._generation_inputs: dict[str, tuple[list[torch.Tensor], list[str], list[int]]] = {}

    def evaluate(self, model: torch.nn.Module, names: Collection[str]) -> dict[str, float]:
        """The metrics ``names`` (``SET.KIND``) of ``model``, in eval mode without gradients.

        Under several processes every rank calls it: the ranks share each subset's examples
        (:func:`fastunlearn.engines.distributed.map_sharded`), every rank takes the means over all of them,
        and the main process's numbers are returned on every rank, so whatever is decided from them
        is decided alike everywhere.
        """
        unknown = sorted(set(names) - self.available)
        if unknown:
            raise ValueError(f"cannot evaluate {unknown} on this data; available: {sorted(self.available)}")
        wanted: dict[str, set[str]] = {}
        # In a fixed order: the ranks' shared evaluations must come in the same sequence on every
        # rank, and a set's order changes with each process's string hashing.
        for name in sorted(names):
            set_name, _, kind = name.partition(".")
            wanted.setdefault(set_name, set()).add(kind)
        out: dict[str, float] = {}
        forced = {
            s: [k for k in _TEACHER_FORCED if k in wanted[s]]
            for s in self.sets
            if s in wanted and any(k in wanted[s] for k in _TEACHER_FORCED)
        }
        if forced:
            out.update(self._teacher_forced(model, forced))
        for set_name, kinds in wanted.items():
            if "rougeL" in kinds:
                out[f"{set_name}.rougeL"] = self._rouge(model, set_name)
            if f"el{EL_N}" in kinds:
                out[f"{set_name}.el{EL_N}"] = self._el(model, set_name)
        return distributed.broadcast_object(out)

    def _forced_batches(
        self, set_names: tuple[str, ...], examples: Sequence[fdata.Example]
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """``examples`` (this process's share of the sets ``set_names``, the same at every evaluation) as
        padded batches sorted by length, and the permutation that puts the batches' rows back in order."""
        key = (set_names, len(examples))
        if key not in self._forced_inputs:
            order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids), reverse=True)
            batches = fdata.batches([examples[i] for i in order], self.pad_id, self.batch_size)
            self._forced_inputs[key] = (batches, torch.tensor(order).argsort())
        return self._forced_inputs[key]

    def _teacher_forced(self, model: torch.nn.Module, kinds: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """``kinds[set]`` of every set in ``kinds``, from one teacher-forced pass over all their examples."""
        set_names = tuple(kinds)

        def stats_of(share: list[fdata.Example]) -> dict[str, torch.Tensor]:
            batches, unsort = self._forced_batches(set_names, share)
            stats = collect_answer_stats(model, batches)
            return {k: stats[k][unsort.to(stats[k].device)] for k in _STATS}

        examples = [ex for name in set_names for ex in self.sets[name]]
        stats = distributed.map_sharded(stats_of, examples, model=model)  # gathered in example order
        nll_sum, tokens, correct = (stats[k].double() for k in _STATS)
        names, values, start = [], [], 0
        for set_name in set_names:
            end = start + len(self.sets[set_name])
            per_kind = _forced_metrics(nll_sum[start:end], tokens[start:end], correct[start:end])
            names += [f"{set_name}.{kind}" for kind in kinds[set_name]]
            values += [per_kind[kind] for kind in kinds[set_name]]
            start = end
        return dict(zip(names, torch.stack(values).tolist()))  # one transfer for all of them

    def _generation(self, set_name: str) -> tuple[list[torch.Tensor], list[str], list[int]]:
        """Prompts, reference answers (decoded text) and token budgets of the set's ROUGE-L."""
        if set_name not in self._generation_inputs:
            eos = self.tokenizer.eos_token_id
            prompts, references, budgets = [], [], []
            for ex in self.sets[set_name]:
                start = next(i for i, label in enumerate(ex.labels) if label != fdata.IGNORE_INDEX)
                answer = list(ex.input_ids[start:])
                if answer and answer[-1] == eos:
                    answer = answer[:-1]
                prompts.append(torch.tensor(ex.input_ids[:start], dtype=torch.long))
                references.append(self.tokenizer.decode(answer, skip_special_tokens=True).strip())
                budgets.append(min(self.max_new_tokens, 2 * max(len(answer), 1)))
            self._generation_inputs[set_name] = (prompts, references, budgets)
        return self._generation_inputs[set_name]

    def _rouge(self, model: torch.nn.Module, set_name: str) -> float:
        prompts, references, budgets = self._generation(set_name)

        def generate(rows: list[int]) -> list[str]:
            return greedy_completions(
                model,
                self.tokenizer,
                [prompts[i] for i in rows],
                [budgets[i] for i in rows],
                batch_size=self.batch_size,
            )

        answers = distributed.map_sharded(generate, range(len(prompts)), model=model)
        return sum(rouge_l_recall(answers, references)) / len(answers)

    def _el(self, model: torch.nn.Module, set_name: str) -> float:
        def el(share: list[fdata.Example]) -> torch.Tensor:
            batch = fdata.collate(share, self.pad_id)
            return extraction_likelihood(
                model,
                batch["input_ids"],
                n=EL_N,
                attention_mask=batch["attention_mask"],
                batch_size=self.batch_size,
            )

        return distributed.map_sharded(el, self.sets[set_name], model=model).mean().item()


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies on the CPU of the parameters that train (the adapters: small), to be put back by
    :func:`_put_back`. Under DeepSpeed ZeRO-3 each is gathered whole, one at a time (a collective:
    every rank keeps a state at the same evaluations, the decision being the main process's); under
    FSDP2 a parameter is a ``DTensor``, and its copy is this rank's shard."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with gathered([param]):
                state[name] = param.detach().to("cpu", copy=True)
    return state


def _put_back(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy :func:`_trainable_state`'s tensors back into the parameters (under ZeRO-3 through a gather
    whose values DeepSpeed partitions back on exit; every rank holds the same copy)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            param = params[name]
            with gathered([param], modifier_rank=0):
                param.copy_(value.to(param.device))


def measure_reference(rule: StopRule, evaluator: SubsetEvaluator, model: torch.nn.Module) -> StopRule:
    """``rule`` resolved with its reference values measured on ``model`` by ``evaluator``: the model
    before unlearning for the extraction rule (its unseen-text MA and EL₁₀), the retain-only model for
    the tofu rule (its forget accuracy and ROUGE-L on the evaluator's forget subset; it must share the
    tokenizer). A resolved rule is returned as is."""
    if rule.resolved:
        return rule
    return rule.with_reference(evaluator.evaluate(model, rule.reference_metrics))


class StoppingCallback(TrainerCallback):
    """Evaluate during training, stop by a rule, keep the chosen state, write the trajectory.

    ``every``: ``"epoch"`` or a number of optimiser steps (the final step is always evaluated).
    ``output_dir``: where ``trajectory.csv`` (after every evaluation) and ``trajectory.png`` (at the
    end, when ``plot``) go; ``None`` keeps the rows in :attr:`trajectory` only. The controller's rule
    may wait for its reference only when that is the model itself (the extraction rule's unseen
    text, measured when training begins); a tofu rule's reference model must be measured first
    (:func:`measure_reference`).

    The model at ``on_train_begin`` is evaluated as the baseline (step 0). At each evaluation the
    controller's :meth:`~fastunlearn.evaluation.stopping.StoppingController.metrics_to_compute` is
    followed until it asks for nothing, so generation runs only when it can matter. When the controller says
    ``keep_state``, the trainable parameters are copied to the CPU (the LoRA weights, not the base
    model); at ``on_train_end`` the chosen state is copied back, so whatever is saved afterwards
    (adapter, merged model, metrics) is that state. :attr:`summary` holds the outcome and the time
    spent evaluating next to the time spent training. Beside each ``Trainer`` checkpoint it keeps its
    record (:meth:`on_save`), from which a resumed run goes on (:meth:`resume_from`).

    Under several processes (``torchrun`` / ``accelerate launch``; every rank runs the callback) each
    evaluation is shared by the ranks and its numbers are the main process's on every rank
    (:meth:`SubsetEvaluator.evaluate`). The controller is pure logic on those numbers, so the decision
    it makes on each rank is the main process's: every rank stops at the same step, snapshots its own
    trainable parameters at the same steps and restores the same state. Sharing the evaluation rather
    than running it on the main process alone costs each rank ``1/W`` of it (the others would wait for
    the whole of it) and works under FSDP / ZeRO-3, whose forwards need every rank (there every rank
    evaluates every example, in step). The main process alone writes ``trajectory.csv`` / ``.png``.
    """

    def __init__(
        self,
        controller: StoppingController,
        evaluator: SubsetEvaluator,
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
        self._eval_seconds = 0.0
        self._setup_seconds = 0.0
        self._train_start: float | None = None
        # A resumed run: the seconds of training and evaluation before the interruption.
        self._resumed = False
        self._train_before = 0.0
        self._eval_before = 0.0

    # -- evaluation --------------------------------------------------------------------------------

    def _complete(self, model: torch.nn.Module) -> dict[str, float]:
        values: dict[str, float] = {}
        while todo := self.controller.metrics_to_compute(values):
            values.update(self.evaluator.evaluate(model, todo))
        return values

    @staticmethod
    def _losses(logs: Mapping[str, Any]) -> dict[str, float]:
        return {k: logs[k] for k in ("loss", "forget_loss", "retain_loss") if k in logs}

    def _logged_loss(self, state) -> dict[str, float]:
        """The loss the trainer has already logged at this step (the step-end log comes before the
        epoch-end evaluation); otherwise :meth:`on_log` adds it when the trainer logs."""
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            if "loss" in entry:
                return self._losses(entry)
        return {}

    def _row(self, state, values: Mapping[str, float], seconds: float, **extra: Any) -> None:
        self.trajectory.append(
            {
                "step": int(state.global_step),
                "epoch": float(state.epoch or 0.0),
                **values,
                **self._logged_loss(state),
                **extra,
                "eval_s": round(seconds, 4),
            }
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        start = time.perf_counter()
        if not distributed.is_main():  # the main process alone writes the trajectory (csv and png)
            self.trajectory.path = None  # asked now: a launcher's process group may start after __init__
        if self._resumed:  # the baseline and the evaluations up to the checkpoint come from it
            self.trajectory.rewrite()
            self._train_start = time.perf_counter()
            return
        controller = self.controller
        if controller.rule is not None and not controller.rule.resolved:
            controller.resolve(self.evaluator.evaluate(model, controller.rule.reference_metrics))
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
        self._setup_seconds = time.perf_counter() - start
        self._row(state, baseline, self._setup_seconds, **extra)
        self._train_start = time.perf_counter()

    def _evaluate(self, state, control, model) -> None:
        history = self.controller.history
        if model is None or (history and history[-1].step == state.global_step):
            return
        start = time.perf_counter()
        values = self._complete(model)
        final = state.global_step >= state.max_steps
        decision = self.controller.record(state.global_step, state.epoch or 0.0, values, final=final)
        if decision.keep_state:
            self._snapshot = (int(state.global_step), _trainable_state(model))
        seconds = time.perf_counter() - start
        self._eval_seconds += seconds
        score = self.controller.history[-1].score
        extra: dict[str, Any] = {} if self.controller.rule is None else {"satisfied": decision.satisfied}
        if score is not None:
            extra["retain_score"] = score
        self._row(state, values, seconds, **extra)
        # The trainer then logs the mean training loss since its previous log, at this very step.
        control.should_log = True
        if decision.stop:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        rows = self.trajectory.rows
        if (
            logs
            and "loss" in logs
            and rows
            and rows[-1]["step"] == state.global_step
            and "loss" not in rows[-1]
        ):
            self.trajectory.update_last(self._losses(logs))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "epoch" and (
            state.global_step % self.every == 0 or state.global_step >= state.max_steps
        ):
            self._evaluate(state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch":
            self._evaluate(state, control, model)

    # -- checkpoints and resuming -----------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        """Beside each ``Trainer`` checkpoint, what a resumed run needs to go on deciding
        (:meth:`resume_from`): the controller's record, the trajectory's rows, the state kept for a
        restore and the seconds spent so far. Not after the run has stopped (nothing to resume)."""
        if self.controller.stopped is not None or not distributed.is_main():
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        record = {
            "controller": self.controller.state_dict(),
            "trajectory": self.trajectory.rows,
            "setup_s": self._setup_seconds,
            "eval_s": self._eval_seconds,
            "train_s": self._train_seconds(),
            "snapshot_step": None if self._snapshot is None else self._snapshot[0],
        }
        if self._snapshot is not None:
            from safetensors.torch import save_file

            atomic_file(os.path.join(folder, SNAPSHOT_FILE), lambda tmp: save_file(self._snapshot[1], tmp))
        write_json(os.path.join(folder, RECORD_FILE), record)

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Continue the record :meth:`on_save` wrote beside ``checkpoint`` (call before training):
        the evaluations up to its step are not repeated, the trajectory goes on from its rows, and a
        state kept before the interruption can still be put back."""
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
        self._setup_seconds = record["setup_s"]
        self._eval_seconds = self._eval_before = record["eval_s"]
        self._train_before = record["train_s"]
        self._snapshot = None
        if record["snapshot_step"] is not None:
            from safetensors.torch import load_file

            self._snapshot = (record["snapshot_step"], load_file(os.path.join(checkpoint, SNAPSHOT_FILE)))
        self._resumed = True

    def _train_seconds(self) -> float:
        """Seconds training (evaluation excluded), before an interruption included."""
        if self._train_start is None:
            return self._train_before
        elapsed = time.perf_counter() - self._train_start
        return self._train_before + elapsed - (self._eval_seconds - self._eval_before)

    # -- the end -----------------------------------------------------------------------------------

    def on_train_end(self, args, state, control, model=None, **kwargs):
        train_seconds = self._train_seconds()
        target = self.controller.restore_target
        if target is not None and model is not None:
            if self._snapshot is None or self._snapshot[0] != target.step:
                raise RuntimeError(f"no saved state for step {target.step} to restore")  # a bug, not input
            _put_back(model, self._snapshot[1])
        self._snapshot = None
        summary = self.controller.summary()
        plot_path = None
        if self.plot and self.trajectory.path is not None and self.trajectory.rows:
            rule = self.controller.rule
            marks = {
                "rule first holds": summary["first_satisfied_step"],
                "stopped": summary["stopped_step"],
                "kept": summary["kept_step"] if summary["restored"] else None,
            }
            path = os.path.join(self.output_dir, "trajectory.png")
            if plot_trajectory(
                self.trajectory.rows,
                path,
                bounds=() if rule is None else rule.bounds,
                marks=marks,
                title=None if rule is None else str(rule),
            ):
                plot_path = path
        self.summary = {
            **summary,
            "eval_items": {name: len(ex) for name, ex in self.evaluator.sets.items()},
            "reference_and_baseline_eval_s": self._setup_seconds,
            "eval_s": self._eval_seconds,
            "train_s": train_seconds,
            "eval_fraction": self._eval_seconds / train_seconds if train_seconds > 0 else None,
            "trajectory_csv": self.trajectory.path,
            "trajectory_png": plot_path,
        }
