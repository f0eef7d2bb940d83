"""The memory plan of an unlearning run: every phase executed on fake tensors, its peak counted.

:func:`plan_memory` builds the model from its ``transformers`` config under ``FakeTensorMode`` (tensors
with shapes and dtypes, no storage) and runs the run's phases with the package's own code
(:mod:`fastunlearn.plan.phases`) while :class:`~fastunlearn.plan.tracker.LiveTensors` counts the live
tensor bytes by kind. So the plan covers any causal LM ``transformers`` can build, every method,
initialisation, precision and option the run has, and changes with the code it runs.

What is planned is the run on one device (``torch.cuda.max_memory_allocated``'s live tensors). The
fake tensors are made on the CPU; a plan for a GPU takes the GPU's chunks of logits and AdamW's
foreach path, and counts no copy to the host; the loss and Fisher operations are planned on their
PyTorch paths (the Triton kernels need no more). Sharded engines (``fsdp``, ``zero3``) are planned by
dividing the weights, trainable state and optimiser moments by the number of devices. Quantised bases
(``load_in_4bit``: NF4 with double quantisation, ``load_in_8bit``) are run in their compute dtype and
their linear layers' weights counted at the quantised size.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastunlearn.fisher.passes import _Tap
from fastunlearn.models.patching import find_causal_lm
from fastunlearn.ops import _ihl_torch, fused_linear
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.configs import _first_line, model_config
from fastunlearn.plan.peak_memory import young_garbage
from fastunlearn.plan.phases import PhaseRunner, Setting
from fastunlearn.plan.tracker import KINDS, LiveTensors

__all__ = ["MemoryPlan", "PhasePlan", "plan_memory", "plan_precision"]

GiB = 2**30
CONTEXT_BYTES = GiB // 2  # the CUDA context and cuBLAS workspaces, outside the allocator
SHARDED = ("fsdp", "zero3")
_SHARDED_KINDS = ("weights", "trainable", "optimizer")


@dataclass(frozen=True)
class PhasePlan:
    """One phase: its peak of live tensor bytes, split by kind, and the step where it happens."""

    name: str
    peak_bytes: int
    kinds: dict[str, int]
    step: str


@dataclass(frozen=True)
class MemoryPlan:
    """Each phase's predicted peak on one device (module docstring)."""

    model: str
    settings: dict[str, Any]
    phases: tuple[PhasePlan, ...]
    notes: tuple[str, ...]
    context_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    @property
    def peak_phase(self) -> PhasePlan:
        return max(self.phases, key=lambda p: p.peak_bytes)

    def phase(self, name: str) -> PhasePlan:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings,
            "phases": [
                {"name": p.name, "peak_bytes": p.peak_bytes, "step": p.step, "kinds": p.kinds} for p in self.phases
            ],
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase.name,
            "context_bytes": self.context_bytes,
            "notes": list(self.notes),
        }

    def format_table(self, *, terms: bool = False) -> str:
        """A plain-text table (GB = 10⁹ bytes, GiB = 2³⁰): a row per phase, with ``terms`` its kinds."""
        head = f"{self.model}: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())
        rows = [head, f"{'phase':<12}{'peak GB':>9}{'GiB':>8}  at"]
        for p in self.phases:
            rows.append(f"{p.name:<12}{p.peak_bytes / 1e9:>9.2f}{p.peak_bytes / GiB:>8.2f}  {p.step}")
            if terms:
                rows += [f"{'':<14}{b / 1e9:>7.3f}  {KINDS[k]}" for k, b in p.kinds.items()]
        total = self.peak_bytes + self.context_bytes
        rows.append(f"{'peak':<12}{self.peak_bytes / 1e9:>9.2f}{self.peak_bytes / GiB:>8.2f}  {self.peak_phase.name}")
        if self.context_bytes:
            rows[-1] += f" (+{self.context_bytes / GiB:.1f} GiB CUDA context: {total / 1e9:.2f} GB on the device)"
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


def plan_precision(precision: str, device: str, init: str) -> str:
    """The compute precision a run on ``device`` (``"cuda"``, ``"cpu"``) would take: ``"auto"`` is
    bf16 on a GPU (compute capability 8.0+ assumed) and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def plan_memory(
    cfg: UnlearnConfig,
    *,
    config: Any = None,
    tokens: int | None = None,
    device: str = "cuda",
    precision: str | None = None,
    dtype: torch.dtype | None = None,
    world_size: int = 1,
    engine: str = "ddp",
) -> MemoryPlan:
    """The memory plan of the run ``cfg`` describes, phase by phase (module docstring).

    ``config``: the model's ``transformers`` config (default: read from ``cfg.model``, see
    :func:`~fastunlearn.plan.configs.model_config`); ``tokens``: the length of every example (default
    ``cfg.max_length``); ``device``: the kind of device the run trains on; ``precision``: the resolved
    precision (default from ``cfg.precision``, :func:`plan_precision`); ``dtype``: the weights' (default:
    the one the run loads them in); ``world_size`` and ``engine``
    (``"ddp"``, ``"zero2"``: replicas; ``"fsdp"``, ``"zero3"``: sharded). ``ValueError`` for a model
    the plan cannot build, naming it.
    """
    config = model_config(cfg.model if config is None else config, trust_remote_code=cfg.trust_remote_code)
    precision = precision or plan_precision(cfg.precision, device, cfg.init)
    setting = Setting(config, max(tokens or cfg.max_length, 2), precision, dtype, target=device)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    live = LiveTensors(fake, host_counts=device == "cpu")
    live.node_kinds[_Tap] = "fisher"
    runner = PhaseRunner(cfg, setting, live)
    _import_model_code(config)
    with _planning(device), fake, live:
        for phase, step, kind, call in runner.steps():
            with live.phase(phase), live.allocating(kind, step):
                _run(call, step, config)
                gc.collect()
    phases = tuple(_sharded(p, world_size) if engine in SHARDED else p for p in _phases(live))
    settings = {
        "device": device,
        "precision": precision,
        "batch": f"{cfg.batch_size}x{setting.tokens}",
        "method": cfg.method,
        "init": cfg.init,
        "rank": cfg.lora_r,
        "checkpointing": "on" if cfg.gradient_checkpointing else "off",
        "fused": {None: "auto", True: "on", False: "off"}[cfg.fused],
        "engine": f"{engine} x {world_size}",
    }
    notes = _notes(cfg, runner, engine, world_size, device)
    name = getattr(config, "_name_or_path", "") or str(cfg.model)
    return MemoryPlan(name, settings, phases, notes, CONTEXT_BYTES if device == "cuda" else 0)


def _import_model_code(config: Any) -> None:
    """Import what the phases import, before the fake run: tensors a module makes when it is first
    imported (default arguments, constants) must be real, not the fake run's."""
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM

    with contextlib.suppress(KeyError, ValueError):  # a model with its own code: imported when built
        AutoModelForCausalLM._model_mapping[type(config)]


def _run(call: Any, step: str, config: Any) -> None:
    """``call()``; a failure other than a ``ValueError`` (the package's own checks) is one line naming
    the step."""
    try:
        call()
    except ValueError:
        raise
    except Exception as err:
        model_type = getattr(config, "model_type", "?")
        if step == "loading":
            raise ValueError(f"transformers cannot build a {model_type!r} causal LM from this config ({_first_line(err)})") from None
        raise ValueError(f"the plan's {step!r} step cannot run a {model_type!r} model ({_first_line(err)})") from None


@contextlib.contextmanager
def _planning(device: str) -> Iterator[None]:
    """The plan's process state: warnings of the fake run silenced, objects from before not scanned by
    the garbage collector, on a GPU the chunks of logits a GPU takes, and the row kernels of the loss
    terms computing nothing (:func:`_rows_forward`)."""
    saved = fused_linear.CPU_CHUNK_ELEMENTS, _ihl_torch.ihl_forward, _ihl_torch.ihl_backward
    if device == "cuda":
        fused_linear.CPU_CHUNK_ELEMENTS = fused_linear.CHUNK_ELEMENTS
    _ihl_torch.ihl_forward, _ihl_torch.ihl_backward = _rows_forward, _rows_backward
    try:
        with warnings.catch_warnings(), young_garbage():
            warnings.simplefilter("ignore")
            yield
    finally:
        fused_linear.CPU_CHUNK_ELEMENTS, _ihl_torch.ihl_forward, _ihl_torch.ihl_backward = saved


def _rows_forward(logits: Tensor, labels: Tensor, ignore_index: int, *, loss: str = "ihl") -> tuple[Tensor, ...]:
    """The row kernels' outputs (per-row loss, four statistics, argmax) as the Triton kernels allocate
    them: under fake tensors the PyTorch path's loop over blocks of rows costs thousands of operators
    and its blocks (a few MiB of scratch) are not the GPU's."""
    n = logits.shape[0] * logits.shape[1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(n, dtype=dtype), logits.new_empty(n, 4, dtype=dtype), labels.new_empty(n)


def _rows_backward(logits, labels, stats, argmax, grad_rows, grad: Tensor, ignore_index) -> Tensor:
    return grad  # written in place


def _phases(live: LiveTensors) -> list[PhasePlan]:
    return [PhasePlan(p.name, p.peak, dict(p.kinds), p.step) for p in live.phases]


def _sharded(phase: PhasePlan, world_size: int) -> PhasePlan:
    kinds = {k: math.ceil(b / world_size) if k in _SHARDED_KINDS else b for k, b in phase.kinds.items()}
    return PhasePlan(phase.name, sum(kinds.values()), kinds, phase.step)


def _notes(cfg: UnlearnConfig, runner: PhaseRunner, engine: str, world_size: int, device: str) -> tuple[str, ...]:
    notes = [f"every example {runner.setting.tokens} tokens, every token labelled, batches padded"]
    if cfg.init == "fila":
        budget = "given" if cfg.fisher_memory is not None else "the smallest (one layer; the run sizes it to the free memory)"
        notes.append(
            f"Fisher: {runner.groups} group(s) of layers under a {runner.budget / GiB:.2f} GiB budget ({budget})"
        )
    if engine in SHARDED and world_size > 1:
        notes.append(f"{engine}: weights, trainable state and optimiser moments divided by {world_size} devices")
    if device == "cuda":
        notes.append("loss and Fisher operations planned on their PyTorch paths (the Triton kernels need no more)")
    return tuple(notes)
