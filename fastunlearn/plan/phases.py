"""The steps of an unlearning run, each a call of the run's own code, on a model built from its config.

Loading, the metrics before and after, the adapters, the Fisher passes, FILA, the reference, a training
step in the steady state (AdamW's moments and the earlier micro-batches' gradients already there) and
the export. Every example has ``tokens`` tokens but a batch's last, one shorter (a padded batch), every
token labelled. Only the Fisher groups that can peak higher run: a group's passes keep the activations
of every layer from its lowest one up, so a later group peaks higher only with more accumulator bytes.
FILA's row weights are ones (values change no memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastunlearn import data as fdata
from fastunlearn.engines.distributed import linear_shape
from fastunlearn.evaluation.likelihood import answer_stats
from fastunlearn.fisher import FilaRowWeights, fila_init, fila_row_weights, lora_layers, parse_bytes
from fastunlearn.fisher.budget import plan_groups, select_linear_layers
from fastunlearn.methods.objectives import Objective, build_objective
from fastunlearn.models.devices import AutocastEachCall, eval_mode, load_dtype
from fastunlearn.models.patching import patch
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.peak_memory import LiveTensors, step_peaks
from fastunlearn.training.adapters import collect_outputs, reference_logprobs, trainable_model

Step = tuple[str, str, str, Callable[[], object]]  # (phase, step, kind of its allocations, call)


@dataclass(frozen=True)
class Setting:
    """What a run is planned for beyond its options: the model's config, an example's tokens, the
    resolved precision, the weights' dtype (default: the run's), where the tensors are made and the
    device the run trains on (``"cuda"``: AdamW's foreach path)."""

    config: Any
    tokens: int
    precision: str
    dtype: torch.dtype | None = None
    device: str = "cpu"
    target: str = "cpu"


class PhaseRunner:
    """The steps of one run; ``tracker``: the counter of a run on fake tensors."""

    def __init__(self, cfg: UnlearnConfig, setting: Setting, tracker: LiveTensors | None = None) -> None:
        self.cfg, self.setting, self.tracker = cfg, setting, tracker
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.spec = cfg.method_spec()
        self.objective: Objective | None = None
        self.budget = self.groups = 0

    def steps(self) -> Iterator[Step]:
        """``(phase, step, kind, call)`` in the run's order; lazily: a step uses what earlier ones made."""
        cfg = self.cfg
        yield "load", "loading", "weights", self.load
        if cfg.evaluate:
            yield "evaluate", "before training", "activations", self.evaluate
        yield "fisher" if cfg.init == "fila" else "train_step", "adapters", "trainable", self.adapters
        if cfg.init == "fila":
            for group in self.fisher_groups():
                span = group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}"
                yield "fisher", f"passes over {span}", "activations", lambda g=group: self.fisher(g)
            yield "fila", "fila_init", "solver", self.fila
        if self.spec.fixed_reference:
            yield "reference", "reference log-probabilities", "activations", self.reference
        yield "train_step", "objective (a copy of the model where it is the reference)", "weights", self.build
        yield "train_step", "earlier micro-batches' gradients", "trainable", self.gradients
        yield "train_step", "optimiser state", "optimizer", self.optimizer_state
        yield "train_step", "forward and backward", "activations", self.micro_batch
        yield "train_step", "clipping and optimiser step", "optimizer", self.optimizer_step
        if cfg.evaluate:
            yield "evaluate", "after training", "activations", self.evaluate
        yield "save", "export", "activations", self.save

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        default = torch.get_default_dtype()
        torch.set_default_dtype(self.setting.dtype or load_dtype(self.setting.precision, self.cfg.init))
        try:
            with torch.device(self.setting.device):
                model = AutoModelForCausalLM.from_config(
                    self.setting.config, trust_remote_code=self.cfg.trust_remote_code
                )
        finally:
            torch.set_default_dtype(default)
        self.model = patch(model, fused=self.cfg.fused, validate=False)
        if self.tracker is not None:
            self.tracker.watch_head(model)
            self._quantised(model)

    def _quantised(self, model: nn.Module) -> None:
        """Count the linear layers' weights but the head's as bitsandbytes stores them (4 or 8 bits)."""
        bits = 4 if self.cfg.load_in_4bit else 8 * self.cfg.load_in_8bit
        if not bits:
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
        """The Fisher groups under the budget that can hold the passes' peak (module docstring)."""
        layers = select_linear_layers(self.model, self.cfg.target_modules)
        sizes = {name: 8 * math.prod(linear_shape(layer)) for name, layer in layers.items()}
        given = self.cfg.fisher_memory
        self.budget = max(sizes.values()) if given is None else parse_bytes(given)
        groups = plan_groups(sizes, self.budget, what="fp32 forget and retain accumulators")
        self.groups, chosen, most = len(groups), [], 0
        for group in groups:
            if sum(sizes[name] for name in group) > most:
                chosen.append(group)
                most = sum(sizes[name] for name in group)
        return chosen

    def fisher(self, group: list[str]) -> None:
        cfg, batches = self.cfg, ([self.batch(self.cfg.fisher_batch_size)] for _ in range(2))
        options = dict(mode=cfg.fisher_mode, eps=cfg.fila_eps, max_memory=self.budget, progress=False)
        fila_row_weights(self.model, *batches, target_modules=group, **options)

    def fila(self) -> None:
        layers = lora_layers(self.model).items()
        rows = {name: torch.ones(linear_shape(layer.get_base_layer())[0]) for name, (_, layer) in layers}
        weights = FilaRowWeights(rows, eps=self.cfg.fila_eps)
        fila_init(self.model, row_weights=weights, solver=self.cfg.fila_solver, seed=self.cfg.seed)

    def reference(self) -> None:
        parts = {name: self.examples(self.cfg.eval_batch_size) for name in self.spec.fixed_reference}
        reference_logprobs(self.model, parts, self.cfg, self.setting.precision, 0)

    def build(self) -> None:
        cfg = self.cfg
        self.objective = build_objective(
            self.spec, self.model, init=cfg.init, precision=self.setting.precision,
            rmu_layer=cfg.rmu_layer, rmu_steering=cfg.rmu_steering, seed=cfg.seed,
        )  # fmt: skip

    def gradients(self) -> None:
        self.model.train()
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def optimizer_state(self) -> None:
        cfg, foreach = self.cfg, self.setting.target == "cuda" or None
        self.optimizer = torch.optim.AdamW(
            self.params, cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=foreach
        )
        self.optimizer.step()  # its moments exist from the first step on
        if cfg.gradient_accumulation_steps == 1:
            self.optimizer.zero_grad(set_to_none=True)

    def micro_batch(self) -> None:
        spec, size = self.spec, self.cfg.batch_size
        batch = {name: self.batch(size) for name in spec.parts}
        for name in spec.fixed_reference:
            batch[name]["ref_logp"] = torch.zeros(size, device=self.setting.device)
        model = AutocastEachCall(self.model, self.setting.precision, torch.device(self.setting.device))
        loss, _ = self.objective(model, batch)
        loss.backward()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self) -> None:
        collect_outputs(self.model, init=self.cfg.init, merge=self.cfg.merge)

    def examples(self, count: int) -> list[fdata.Example]:
        lengths = [self.setting.tokens] * (count - 1) + [self.setting.tokens - 1]
        return [fdata.Example((1,) * n, (1,) * n, "plan") for n in lengths]

    def batch(self, count: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.setting.device) for k, v in fdata.collate(self.examples(count), 0).items()}


def quantised_bytes(weight: torch.Tensor, bits: int) -> int:
    """Bytes of a linear weight as bitsandbytes stores it: NF4 with double quantisation (two weights a
    byte, an 8-bit scale per 64, an fp32 one per 256 blocks, 1092 bytes of tables) or LLM.int8 (a byte
    a weight, an fp32 scale per row)."""
    n = weight.numel()
    if bits == 4:
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 16 + 1)
    return n + 4 * weight.shape[0]


def measure_phases(cfg: UnlearnConfig, setting: Setting) -> dict[str, int]:
    """Each phase's peak of live tensor bytes on real tensors, from before the model is built."""
    steps = PhaseRunner(cfg, setting).steps()
    names: list[str] = []
    calls = (names.append(phase) or call for phase, _, _, call in steps)
    peaks: dict[str, int] = {}
    for phase, peak in zip(names, step_peaks(calls, setting.device)):
        peaks[phase] = max(peaks.get(phase, 0), peak)
    return peaks
