"""The memory plan of an unlearning run: its phases run on fake tensors, each one's peak counted.

The model is built from its config under ``FakeTensorMode`` and the run's own code runs each step while
:class:`~fastunlearn.plan.peak_memory.LiveTensors` counts live bytes by kind: every model ``transformers``
builds and every option of the run, planned by the code that runs it. A plan is for one device; planned
for a GPU the logits' chunks are the GPU's, AdamW takes its foreach path and host copies are free. The
row kernels are planned as the Triton kernels allocate. Sharded engines divide the weights, trainable
state and optimiser moments by the devices; quantised layers count as stored. The config comes from a
model directory, a ``config.json``, a cached Hub id, a config object, or a well-known model (its
published fields, shipped here: no download).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastunlearn.fisher.passes import _Tap
from fastunlearn.models.loading import read_json_object
from fastunlearn.ops import _ihl_torch, fused_linear
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.peak_memory import KINDS, LiveTensors, PhasePeak, young_garbage
from fastunlearn.plan.phases import PhaseRunner, Setting

GiB = 2**30
CONTEXT_BYTES = GiB // 2  # the CUDA context and cuBLAS workspaces, outside the allocator
SHARDED = ("fsdp", "zero3")
_LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
_GQA = {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-2-7b-hf, meta-llama/Meta-Llama-3-8B, mistralai/Mistral-7B-v0.1
    "llama2-7b": {**_LLAMA, "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096},
    "llama3-8b": {**_GQA, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "mistral-7b": {**_GQA, "model_type": "mistral", "vocab_size": 32000, "sliding_window": 4096},
    # Qwen/Qwen2.5-7B
    "qwen2.5-7b": {
        **{"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28},
        **{"num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1e6},
    },
    # microsoft/phi-1_5, EleutherAI/gpt-neo-2.7B
    "phi-1.5": {
        **{"model_type": "phi", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24},
        **{"num_attention_heads": 32, "vocab_size": 51200, "partial_rotary_factor": 0.5},
    },
    "gpt-neo-2.7b": {
        **{"model_type": "gpt_neo", "hidden_size": 2560, "num_layers": 32, "num_heads": 20},
        **{"vocab_size": 50257, "attention_types": [[["global", "local"], 16]], "window_size": 256},
    },
}


@dataclass(frozen=True)
class MemoryPlan:
    """Each phase's predicted peak on one device (module docstring)."""

    model: str
    settings: dict[str, Any]
    phases: tuple[PhasePeak, ...]
    notes: tuple[str, ...]
    context_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.peak_phase.peak_bytes

    @property
    def peak_phase(self) -> PhasePeak:
        return max(self.phases, key=lambda p: p.peak_bytes)

    def phase(self, name: str) -> PhasePeak:
        return next(p for p in self.phases if p.name == name)

    def to_json(self) -> dict[str, Any]:
        phases = [dataclasses.asdict(p) for p in self.phases]
        return {
            **{k: getattr(self, k) for k in ("model", "settings", "peak_bytes", "context_bytes")},
            **{"peak_phase": self.peak_phase.name, "phases": phases, "notes": list(self.notes)},
        }

    def format_table(self, *, terms: bool = False) -> str:
        """A plain-text table (GB = 10⁹ bytes, GiB = 2³⁰): a row per phase, with ``terms`` its kinds."""
        rows = [f"{self.model}: " + ", ".join(f"{k}={v}" for k, v in self.settings.items())]
        rows.append(f"{'phase':<12}{'peak GB':>9}{'GiB':>8}  at")
        for p in (*self.phases, dataclasses.replace(self.peak_phase, name="peak", step=self.peak_phase.name)):
            rows.append(f"{p.name:<12}{p.peak_bytes / 1e9:>9.2f}{p.peak_bytes / GiB:>8.2f}  {p.step}")
            rows += [
                f"{'':<14}{b / 1e9:>7.3f}  {KINDS[k]}"
                for k, b in p.kinds.items()
                if terms and p.name != "peak"
            ]
        if self.context_bytes:
            total = (self.peak_bytes + self.context_bytes) / 1e9
            rows[-1] += f" (+{self.context_bytes / GiB:.1f} GiB CUDA context: {total:.2f} GB on the device)"
        return "\n".join(rows + [f"note: {n}" for n in self.notes])


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
    """The memory plan of the run ``cfg`` describes on a ``device`` (``"cuda"``, ``"cpu"``).

    ``config``: the model's (default: from ``cfg.model``); ``tokens``: every example's length (default
    ``cfg.max_length``); ``precision``: resolved (default: ``cfg.precision``, auto: bf16 on a GPU);
    ``dtype``: the weights' (default: the run's); ``engine`` over ``world_size`` devices. A one-line
    ``ValueError`` for a model or option the run would refuse or the plan cannot run.
    """
    config = model_config(cfg.model if config is None else config, trust_remote_code=cfg.trust_remote_code)
    if precision is None:
        precision = cfg.precision if cfg.precision != "auto" else "bf16" if device == "cuda" else "fp32"
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
    phases = tuple(_sharded(p, world_size) if engine in SHARDED else p for p in live.phases)
    settings = {"device": device, "precision": precision, "batch": f"{cfg.batch_size}x{setting.tokens}"}
    settings.update(
        method=cfg.method, init=cfg.init, rank=cfg.lora_r, fused={None: "auto"}.get(cfg.fused, cfg.fused)
    )
    settings.update(
        checkpointing="on" if cfg.gradient_checkpointing else "off", engine=f"{engine} x {world_size}"
    )
    name = getattr(config, "_name_or_path", "") or str(cfg.model)
    notes = _notes(cfg, runner, engine, world_size)
    return MemoryPlan(name, settings, phases, notes, CONTEXT_BYTES if device == "cuda" else 0)


def _import_model_code(config: Any) -> None:
    """Import the phases' modules before the fake run: tensors made on import must be real."""
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM

    with contextlib.suppress(KeyError, ValueError):  # a model with its own code: imported when built
        AutoModelForCausalLM._model_mapping[type(config)]


def _run(call: Any, step: str, config: Any) -> None:
    """``call()``; a failure but a ``ValueError`` (the package's own checks) becomes one naming the step."""
    try:
        call()
    except ValueError:
        raise
    except Exception as err:
        kind = getattr(config, "model_type", "?")
        if step == "loading":
            raise ValueError(f"transformers cannot build a {kind!r} causal LM ({first_line(err)})") from None
        raise ValueError(
            f"the plan's {step!r} step cannot run a {kind!r} model ({first_line(err)})"
        ) from None


@contextlib.contextmanager
def _planning(device: str) -> Iterator[None]:
    """The fake run's state: warnings silenced, old objects frozen for the collector, a GPU's logits
    chunks on a GPU, the row kernels as Triton allocates (the PyTorch path's loop costs thousands of ops)."""
    saved = fused_linear.CPU_CHUNK_ELEMENTS, _ihl_torch.ihl_forward, _ihl_torch.ihl_backward
    if device == "cuda":
        fused_linear.CPU_CHUNK_ELEMENTS = fused_linear.CHUNK_ELEMENTS
    _ihl_torch.ihl_forward, _ihl_torch.ihl_backward = _rows_forward, lambda *args: args[5]  # in place
    try:
        with warnings.catch_warnings(), young_garbage():
            warnings.simplefilter("ignore")
            yield
    finally:
        fused_linear.CPU_CHUNK_ELEMENTS, _ihl_torch.ihl_forward, _ihl_torch.ihl_backward = saved


def _rows_forward(
    logits: Tensor, labels: Tensor, ignore_index: int, *, loss: str = "ihl"
) -> tuple[Tensor, ...]:
    """The row kernels' outputs: per-row loss, four statistics and argmax."""
    n = logits.shape[0] * logits.shape[1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(n, dtype=dtype), logits.new_empty(n, 4, dtype=dtype), labels.new_empty(n)


def _sharded(phase: PhasePeak, world_size: int) -> PhasePeak:
    shared = ("weights", "trainable", "optimizer")
    kinds = {k: math.ceil(b / world_size) if k in shared else b for k, b in phase.kinds.items()}
    return dataclasses.replace(phase, peak_bytes=sum(kinds.values()), kinds=kinds)


def _notes(cfg: UnlearnConfig, runner: PhaseRunner, engine: str, world_size: int) -> tuple[str, ...]:
    notes = [f"every example {runner.setting.tokens} tokens, every token labelled, batches padded"]
    if cfg.init == "fila":
        why = "" if cfg.fisher_memory is not None else ": the smallest, the run takes what is free"
        notes.append(f"Fisher passes in {runner.groups} groups of layers, {runner.budget / GiB:.2f} GiB{why}")
    if cfg.quantised:
        notes.append("linear layers' weights quantised (bitsandbytes), the rest in the compute dtype")
    if engine in SHARDED and world_size > 1:
        notes.append(
            f"{engine}: weights, trainable state and optimiser moments divided by {world_size} devices"
        )
    return tuple(notes)


def model_config(source: Any, *, trust_remote_code: bool = False) -> Any:
    """The config of ``source`` (module docstring; a peft adapter: its base model's, a dict: its fields);
    a one-line ``ValueError`` for a source it cannot read."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        return _from_fields(dict(source), "the config")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"a model configuration is a path, a name or a config object, not {type(source).__name__}"
        )
    name = os.fspath(source)
    if name in KNOWN_MODELS:
        return _from_fields(dict(KNOWN_MODELS[name]), name)
    if os.path.isfile(name):
        return _from_fields(read_json_object(name), name)
    adapter = os.path.join(name, "adapter_config.json")
    if os.path.isfile(adapter) and not os.path.isfile(os.path.join(name, "config.json")):
        base = read_json_object(adapter).get("base_model_name_or_path")  # a peft adapter: its base's config
        return model_config(base or name, trust_remote_code=trust_remote_code)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"model directory {name!r} holds no config.json")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError:
        raise ValueError(
            f"{name!r} is not a model directory, a config.json, a Hub id in the local cache nor a known "
            f"model ({', '.join(KNOWN_MODELS)})"
        ) from None
    except Exception as err:  # transformers' validators raise their own types
        raise ValueError(f"{name}: transformers cannot read its config ({first_line(err)})") from None


def _from_fields(fields: dict[str, Any], name: str) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{name}: model_type {model_type!r} is not one transformers knows")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # transformers' validators raise their own types
        raise ValueError(
            f"{name}: transformers cannot build a {model_type!r} config ({first_line(err)})"
        ) from None


def first_line(err: BaseException) -> str:
    """The last line of ``err``'s message (wrappers put the cause last), at most 200 characters."""
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return (text[-1][:200] if text else "") or type(err).__name__
