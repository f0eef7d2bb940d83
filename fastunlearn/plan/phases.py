"""The phases of an unlearning run, executed by the package's own code on a model built from its config.

:class:`PhaseRunner` lists the steps of :func:`fastunlearn.unlearn` in order, each one a call of the
functions the run calls: loading (``from_config`` in the weights' dtype, :func:`~fastunlearn.patch`),
the metrics before training (:func:`~fastunlearn.evaluation.likelihood.answer_stats`), the adapters
(:func:`~fastunlearn.training.adapters.trainable_model`), the Fisher passes
(:func:`~fastunlearn.fisher.fila_row_weights` under the run's ``fisher_memory``), FILA
(:func:`~fastunlearn.fisher.fila_init`), NPO's reference (:func:`~fastunlearn.training.adapters.reference_logprobs`),
a training step in the steady state (AdamW's moments and, under gradient accumulation, the earlier
micro-batches' gradients already there; :func:`~fastunlearn.methods.objectives.method_loss` under the
autocast ``Trainer`` applies per model call; clipping; the optimiser step), the metrics after training
and the export (:func:`~fastunlearn.training.exports.collect_outputs`, in memory). Batches are
full-length: ``tokens`` per example, one example a token shorter so that the batch is padded, every
position labelled.

The Fisher passes run for the groups of layers that can hold their peak: a group's passes keep the
activations of every layer from its lowest one up, so a later group can only peak higher with more
accumulator bytes than every earlier one (:meth:`PhaseRunner.fisher_groups`). FILA's row weights are
ones (their values do not change the memory).

The same steps run on fake tensors (:func:`fastunlearn.plan.plan.plan_memory`) or on real ones
(:func:`measure_phases`, what the tests and ``benchmarks/bench_scale.py`` compare the plan with).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn.engines.sharded import linear_shape
from fastunlearn.evaluation.likelihood import answer_stats
from fastunlearn.fisher import FilaRowWeights, fila_init, fila_row_weights, lora_layers, parse_bytes
from fastunlearn.fisher.budget import plan_groups
from fastunlearn.fisher.layers import select_linear_layers
from fastunlearn.methods.objectives import NEEDS_RETAIN, method_loss
from fastunlearn.models.devices import eval_mode, model_device
from fastunlearn.models.patching import patch
from fastunlearn.models.precision import autocast, load_dtype
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.peak_memory import step_peaks
from fastunlearn.plan.tracker import LiveTensors
from fastunlearn.training.adapters import reference_logprobs, trainable_model
from fastunlearn.training.exports import collect_outputs

__all__ = ["PHASES", "PhaseRunner", "Setting", "Step", "measure_phases"]

PHASES = ("load", "evaluate", "fisher", "fila", "reference", "train_step", "save")
Step = tuple[str, str, str, Callable[[], object]]  # (phase, step, kind of its allocations, call)


@dataclass(frozen=True)
class Setting:
    """What a plan is made for beyond the run's options: the model's ``transformers`` config, the
    tokens of an example, the resolved precision (``"fp32"``, ``"bf16"``, ``"fp16"``), the dtype of the
    weights (default: the one the run loads them in), the device the tensors are made on and the kind
    of device the run trains on (``"cuda"`` picks AdamW's foreach path)."""

    config: Any
    tokens: int
    precision: str
    dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    target: str = "cpu"


class _AutocastEachCall(nn.Module):
    """``module`` called under the run's autocast, one region per call, as accelerate wraps a
    ``Trainer``'s model (a wrapper :func:`~fastunlearn.models.patching.find_causal_lm` sees through)."""

    def __init__(self, module: nn.Module, precision: str) -> None:
        super().__init__()
        self.module, self.precision = module, precision

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.precision, model_device(self.module)):
            return self.module(*args, **kwargs)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class PhaseRunner:
    """The steps of one run (module docstring). ``tracker``: the counter of a run on fake tensors,
    told where the output head, the gradients and the quantised weights are."""

    def __init__(self, cfg: UnlearnConfig, setting: Setting, tracker: LiveTensors | None = None) -> None:
        self.cfg, self.setting, self.tracker = cfg, setting, tracker
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.budget = 0
        self.groups = 0

    def steps(self) -> Iterator[Step]:
        cfg = self.cfg
        yield "load", "loading", "weights", self.load
        if cfg.evaluate:
            yield "evaluate", "before training", "activations", self.evaluate
        first = "fisher" if cfg.init == "fila" else "train_step"
        yield first, "adapters", "trainable", self.adapters
        if cfg.init == "fila":
            for group in self.fisher_groups():
                yield "fisher", f"passes over {_span(group)}", "activations", lambda g=group: self.fisher(g)
            yield "fila", "fila_init", "solver", self.fila
        if cfg.method == "npo":
            yield "reference", "NPO reference", "activations", self.reference
        yield "train_step", "earlier micro-batches' gradients", "trainable", self.gradients
        yield "train_step", "optimiser state", "optimizer", self.optimizer_state
        yield "train_step", "forward and backward", "activations", self.micro_batch
        yield "train_step", "clipping and optimiser step", "optimizer", self.optimizer_step
        if cfg.evaluate:
            yield "evaluate", "after training", "activations", self.evaluate
        yield "save", "export", "activations", self.save

    # -- the steps --------------------------------------------------------------------------------

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        dtype = self.setting.dtype or load_dtype(self.setting.precision, self.cfg.init)
        with _default_dtype(dtype), torch.device(self.setting.device):
            model = AutoModelForCausalLM.from_config(self.setting.config)
        self.model = patch(model, fused=self.cfg.fused, validate=False)
        if self.tracker is not None:
            self.tracker.watch_head(model)
            self._quantise(model)

    def _quantise(self, model: nn.Module) -> None:
        """Count the linear layers' weights (but the output head's) at their quantised size, as
        bitsandbytes loads them (``load_in_4bit`` / ``load_in_8bit``); the model runs in its dtype."""
        bits = _quantised_bits(self.cfg)
        if bits is None:
            return
        head = model.get_output_embeddings()
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                self.tracker.claim(module.weight, "weights", quantised_bytes(module.weight, bits))
        self.tracker.restart_peak()

    def evaluate(self) -> None:
        with eval_mode(self.model):
            answer_stats(self.model, self.batch(self.cfg.eval_batch_size))

    def adapters(self) -> None:
        self.model = trainable_model(self.model, self.cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.tracker is not None:
            self.tracker.count_gradients(self.params)

    def fisher_groups(self) -> list[list[str]]:
        """The groups of layers whose Fisher passes are planned (module docstring), of all the groups
        :func:`~fastunlearn.fisher.budget.plan_groups` makes under the budget."""
        layers = select_linear_layers(self.model, self.cfg.target_modules)
        sizes = {name: 8 * math.prod(linear_shape(layer)) for name, layer in layers.items()}
        given = self.cfg.fisher_memory
        self.budget = max(sizes.values()) if given is None else parse_bytes(given)
        groups = plan_groups(sizes, self.budget, what="fp32 forget and retain accumulators")
        self.groups = len(groups)
        chosen, most = [], 0
        for group in groups:
            size = sum(sizes[name] for name in group)
            if size > most:
                chosen.append(group)
                most = size
        return chosen

    def fisher(self, group: list[str]) -> None:
        cfg = self.cfg
        forget, retain = self.batch(cfg.fisher_batch_size), self.batch(cfg.fisher_batch_size)
        fila_row_weights(
            self.model,
            [forget],
            [retain],
            target_modules=group,
            mode=cfg.fisher_mode,
            eps=cfg.fila_eps,
            max_memory=self.budget,
            progress=False,
        )

    def fila(self) -> None:
        rows = {name: torch.ones(linear_shape(layer.get_base_layer())[0]) for name, (_, layer) in lora_layers(self.model).items()}
        weights = FilaRowWeights(rows, eps=self.cfg.fila_eps)
        fila_init(self.model, row_weights=weights, solver=self.cfg.fila_solver, seed=self.cfg.seed)

    def reference(self) -> None:
        examples = self.examples(self.cfg.eval_batch_size)
        reference_logprobs(self.model, examples, self.cfg, self.setting.precision, 0)

    def gradients(self) -> None:
        self.model.train()
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def optimizer_state(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            foreach=self.setting.target == "cuda" or None,
        )
        self.optimizer.step()  # its moments exist from the first step on
        if cfg.gradient_accumulation_steps == 1:
            self.optimizer.zero_grad(set_to_none=True)

    def micro_batch(self) -> None:
        cfg = self.cfg
        batch = {"forget": self.batch(cfg.batch_size)}
        if cfg.method in NEEDS_RETAIN:
            batch["retain"] = self.batch(cfg.batch_size)
        if cfg.method == "npo":
            batch["forget"]["ref_logp"] = torch.zeros(cfg.batch_size)
        model = _AutocastEachCall(self.model, self.setting.precision)
        loss, _ = method_loss(model, batch, cfg.method, npo_beta=cfg.npo_beta)
        loss.backward()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self) -> None:
        collect_outputs(self.model, init=self.cfg.init, merge=self.cfg.merge)

    # -- data ------------------------------------------------------------------------------------

    def examples(self, count: int) -> list[fdata.Example]:
        """``count`` examples of ``tokens`` tokens, the last one a token shorter (a padded batch),
        every token labelled."""
        T = self.setting.tokens
        lengths = [T] * (count - 1) + [T - 1]
        return [fdata.Example((1,) * n, (1,) * n, "plan") for n in lengths]

    def batch(self, count: int) -> dict[str, torch.Tensor]:
        batch = fdata.collate(self.examples(count), 0)
        return {key: value.to(self.setting.device) for key, value in batch.items()}


def _quantised_bits(cfg: UnlearnConfig) -> int | None:
    if getattr(cfg, "load_in_4bit", False):
        return 4
    return 8 if getattr(cfg, "load_in_8bit", False) else None


def quantised_bytes(weight: torch.Tensor, bits: int) -> int:
    """Bytes of a linear layer's weight stored by bitsandbytes: NF4 with double quantisation (two
    weights a byte, an 8-bit scale per block of 64 and an fp32 scale per 256 of those, plus the code
    tables), or LLM.int8 (a byte a weight and an fp32 scale per row)."""
    n = weight.numel()
    if bits == 4:
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 16 + 1)
    return n + 4 * weight.shape[0]


def _span(group: list[str]) -> str:
    return group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}"


def measure_phases(cfg: UnlearnConfig, setting: Setting) -> dict[str, int]:
    """Each phase's peak of live tensor bytes, the steps run on real tensors on ``setting.device``
    (:func:`~fastunlearn.plan.peak_memory.step_peaks`: the profiler's allocation events on CPU, the
    allocator's counters on CUDA), counted from before the model is built."""
    names: list[str] = []

    def calls() -> Iterator[Callable[[], object]]:
        for phase, _, _, call in PhaseRunner(cfg, setting).steps():  # lazily: steps use
            names.append(phase)  # what the earlier ones made
            yield call

    peaks: dict[str, int] = {}
    for phase, peak in zip(names, step_peaks(calls(), setting.device)):
        peaks[phase] = max(peaks.get(phase, 0), peak)
    return peaks
