"""Per-epoch evaluation inside any ``transformers.Trainer`` (the unlearning loop included).

:class:`EpochEvaluationCallback` measures after every epoch, keeps the history and the best epoch;
:class:`ExtractionStoppingCallback` is the extraction protocol's stopping rule (SPEC §4), deprecated:
the rule is built in (``unlearn(stop="extraction", unseen=...)``, ``--stop-when extraction``:
:class:`~fastunlearn.evaluation.stopping.ExtractionRule` decided by
:class:`~fastunlearn.evaluation.stop_callback.StoppingCallback`, which also evaluates on bounded subsets,
restores the kept state and writes the trajectory). This module does not import the unlearning loop:
the callbacks are given to it (``unlearn(callbacks=[...])``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from fastunlearn.evaluation import metrics as M

__all__ = ["EpochEvaluationCallback", "ExtractionStoppingCallback"]


class EpochEvaluationCallback(TrainerCallback):
    """Evaluate after every epoch (and before training), keep the history, and keep the best epoch.

    ``evaluate_fn(model) -> dict[str, float]`` computes the metrics. With ``metric`` set, the best
    epoch (``mode="min"`` or ``"max"`` of that metric) is tracked; with ``restore_best=True`` its
    trainable parameters are also copied to CPU, and restored into the model when training ends, so
    whatever the trainer saves afterwards is the best checkpoint. ``history`` holds one dict per
    evaluation with ``epoch`` and ``step``; ``best`` the best one.
    """

    def __init__(
        self,
        evaluate_fn: Callable[[torch.nn.Module], Mapping[str, float]],
        *,
        metric: str | None = None,
        mode: str = "max",
        restore_best: bool = True,
        evaluate_at_start: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.evaluate_fn, self.metric, self.mode = evaluate_fn, metric, mode
        self.restore_best, self.evaluate_at_start = restore_best, evaluate_at_start
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def _run(self, model, state) -> dict[str, Any]:
        record = {
            "epoch": float(state.epoch or 0.0),
            "step": int(state.global_step),
            **dict(self.evaluate_fn(model)),
        }
        self.history.append(record)
        if self.metric is not None:
            if self.metric not in record:
                raise ValueError(f"evaluate_fn returned no {self.metric!r}; it returned {sorted(record)}")
            value = record[self.metric]
            better = self.best is None or (
                value < self.best[self.metric] if self.mode == "min" else value > self.best[self.metric]
            )
            if better:
                self.best = record
            if better and self.restore_best:  # the copy costs a model's worth of host memory
                self._best_state = {
                    k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad
                }
        return record

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.evaluate_at_start and model is not None and not self.history:
            self._run(model, state)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.on_evaluated(self._run(model, state), control)

    def on_evaluated(self, record: Mapping[str, Any], control) -> None:
        """Hook for subclasses (stopping rules)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.restore_best and self._best_state is not None and model is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in self._best_state.items():
                    params[k].copy_(v.to(params[k].device))


class ExtractionStoppingCallback(EpochEvaluationCallback):
    """The extraction stopping rule (SPEC §4; Jang et al. 2023): after each epoch, measure mean MA and
    mean EL_n on the forget sequences, and stop once **both** are below the thresholds.

    Thresholds are given (``ma_threshold``, ``el_threshold``; the published GPT-Neo-125M values are
    0.2994 and 0.0499) or measured on held-out sequences the model never saw (``held_out_ids``) with
    the model before training.

    Deprecated (``FutureWarning``): the same rule is :class:`~fastunlearn.evaluation.stopping.ExtractionRule`,
    built into :func:`fastunlearn.unlearn` (``stop="extraction"``) and the ``StoppingCallback`` for any
    ``Trainer``; this class stays for code written against it and will be removed.
    """

    def __init__(
        self,
        forget_ids: torch.Tensor,
        forget_mask: torch.Tensor | None = None,
        *,
        ma_threshold: float | None = None,
        el_threshold: float | None = None,
        held_out_ids: torch.Tensor | None = None,
        held_out_mask: torch.Tensor | None = None,
        n: int = 10,
        batch_size: int = 64,
        restore_best: bool = False,
    ) -> None:
        warnings.warn(
            "ExtractionStoppingCallback is deprecated and will be removed: the extraction rule is built "
            "in — unlearn(stop='extraction', unseen=...) / --stop-when extraction, or StoppingCallback "
            "with fastunlearn.evaluation.stopping.ExtractionRule for your own Trainer",
            FutureWarning,
            stacklevel=2,
        )
        given = (ma_threshold is not None, el_threshold is not None)
        if given[0] != given[1]:
            raise ValueError("give both ma_threshold and el_threshold, or neither (and held_out_ids)")
        if not given[0] and held_out_ids is None:
            raise ValueError(
                "the stopping rule needs thresholds: ma_threshold and el_threshold, "
                "or held_out_ids to measure them on unseen text"
            )
        self.forget = (forget_ids, forget_mask)
        self.held_out = (held_out_ids, held_out_mask)
        self.ma_threshold, self.el_threshold = ma_threshold, el_threshold
        self.n, self.batch_size = n, batch_size
        self.stopped_at: dict[str, Any] | None = None
        super().__init__(self._measure, metric=f"el_{n}", mode="min", restore_best=restore_best)

    def _stats(self, model, ids, mask) -> dict[str, float]:
        ma, el = M.extraction_metrics(model, ids, n=self.n, attention_mask=mask, batch_size=self.batch_size)
        return {"ma": ma.mean().item(), f"el_{self.n}": el.mean().item()}

    def _measure(self, model) -> dict[str, float]:
        return self._stats(model, *self.forget)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ma_threshold is None and model is not None:
            ref = self._stats(model, *self.held_out)
            self.ma_threshold, self.el_threshold = ref["ma"], ref[f"el_{self.n}"]
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def on_evaluated(self, record, control) -> None:
        if record["ma"] < self.ma_threshold and record[f"el_{self.n}"] < self.el_threshold:
            self.stopped_at = dict(record)
            control.should_training_stop = True
