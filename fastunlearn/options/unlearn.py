"""The options of ``fastunlearn unlearn`` / :func:`fastunlearn.unlearn` (:class:`UnlearnConfig`), and
those ``plan`` (:class:`PlanOptions`) and ``demo`` (:class:`DemoOptions`) take beside a run's.

Defaults are Cha et al.'s (ICLR 2025, arXiv 2408.06621) recipe for 7B models: LoRA r = 32, alpha = 64,
no dropout, on every linear layer but the output head; AdamW, weight decay 0.01; an effective batch of
32; one epoch of linear warm-up, then linear decay.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from fastunlearn.engines.base import ENGINES
from fastunlearn.engines.fsdp import check_single_engine, parse_fsdp
from fastunlearn.evaluation.stopping.controller import RESTORE, parse_eval_every
from fastunlearn.fisher import FISHER_MODES, SOLVERS, parse_bytes
from fastunlearn.methods import FORGET_TERMS, METHODS, RETAIN_TERMS, MethodSpec, resolve_method
from fastunlearn.models.devices import PRECISIONS
from fastunlearn.ops._backend import BACKENDS
from fastunlearn.options.common import DataShape, ModelAccess, RunControl
from fastunlearn.options.evaluate import EvalSuite
from fastunlearn.options.schema import Validated, option, require, validate

INITS = ("fila", "lora", "full")
DEMO_SIZES = ("small", "tiny")
# Experiment trackers (transformers' integrations) and the packages that provide each.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",)}


@dataclass
class UnlearnConfig(RunControl, EvalSuite, DataShape, ModelAccess):
    """Every option of an unlearning run."""

    forget: Any = option(
        None,
        "the forget set: a JSON Lines, Parquet or CSV file, a datasets folder (FOLDER@SPLIT) or a Hub data "
        "set NAME[:CONFIG][@SPLIT]; in Python also records", path=True, group="data",
    )  # fmt: skip
    retain: Any = option(
        None, "the retain set, in the same forms (not needed by ga)", path=True, group="data"
    )
    output_dir: Any = option(
        None, "output directory", flag="--output", path="output", identity=False, required=True
    )
    method: str = option(
        "ihl", "unlearning method: a forget term plus a retain term", choices=METHODS, plan=True
    )
    init: str = option("fila", "adapter initialisation (full: full fine-tuning)", choices=INITS, plan=True)
    num_epochs: float = option(5.0, "epochs", flag="--epochs", positive=True, group="training")
    learning_rate: float = option(1e-4, "peak learning rate", flag="--lr", positive=True, group="training")
    batch_size: int = option(
        4, "forget examples per micro-batch and device", positive=True, plan=True, group="training"
    )
    gradient_accumulation_steps: int = option(
        8, "micro-batches per optimiser step", flag="--grad-accum", positive=True, group="training", plan=True
    )
    warmup_epochs: float = option(1.0, "epochs of linear warm-up", minimum=0, group="training")
    weight_decay: float = option(0.01, "AdamW's weight decay", minimum=0, group="training")
    max_grad_norm: float = option(1.0, "gradient clipping norm", positive=True, group="training")
    seed: int = option(0, "seed of the pairing, LoRA's initialisation and training", group="training")
    precision: str = option(
        "auto", "compute precision (auto: bf16 on CUDA GPUs that support it, else fp32)", choices=PRECISIONS,
        consts={"--bf16": "bf16"}, plan=True, group="training",
    )  # fmt: skip
    fused: bool | None = option(
        None, "compute the losses from the hidden states, without the logits (default: where possible)",
        identity=False, plan=True, group="training",
    )  # fmt: skip
    ihl_backend: str = option(
        "auto", "kernels of the loss terms (auto: Triton on CUDA, else PyTorch)", flag="--kernel-backend",
        choices=BACKENDS, identity=False, group="training",
    )  # fmt: skip
    gradient_checkpointing: bool = option(
        False, "trade compute for activation memory", plan=True, group="training"
    )
    memory_check: bool = option(
        True, "refuse a run whose memory plan exceeds the device", negate=True, identity=False,
        group="training",
    )  # fmt: skip
    fsdp: str | None = option(
        None, 'shard the model with FSDP2 under torchrun, e.g. "full_shard auto_wrap"', metavar="WORDS",
        check=lambda v: parse_fsdp(v) and None, group="training",
    )  # fmt: skip
    deepspeed: Any = option(
        None, "train under DeepSpeed ZeRO with this config", metavar="CONFIG.json", path=True,
        group="training",
    )  # fmt: skip
    forget_term: str | None = option(
        None, "the forget term, instead of the method's", choices=FORGET_TERMS, plan=True, group="method"
    )
    retain_term: str | None = option(
        None, "the retain term, instead of the method's", choices=RETAIN_TERMS, plan=True, group="method"
    )
    forget_weight: float | None = option(
        None, "gamma, the forget term's weight (default: the method's)", minimum=0, group="method"
    )
    retain_weight: float | None = option(
        None, "alpha, the retain term's weight (default: the method's)", minimum=0, group="method"
    )
    beta: float | None = option(
        None, "beta of npo and dpo (default 0.1) and simnpo (default 4.5)", positive=True, group="method"
    )
    simnpo_delta: float = option(0.0, "SimNPO's margin delta", group="method")
    idk: Any = option(
        None, "refusal answers of idk and dpo, one a line (default: the package's)", metavar="FILE",
        path=True, group="method",
    )  # fmt: skip
    rmu_layer: int | None = option(
        None, "RMU's steered decoder layer, from 0 (default 7, or the middle one)", minimum=0, group="method"
    )
    rmu_steering: float = option(6.5, "RMU's steering coefficient c", positive=True, group="method")
    rmu_train_layers: list[int] | None = option(
        None, "layers whose MLP down-projection RMU trains (default: rmu_layer-2 .. rmu_layer)",
        metavar="I[,I...]", plan=True, group="method",
    )  # fmt: skip
    lora_r: int = option(32, "LoRA rank r", flag="--rank", positive=True, plan=True, group="LoRA / FILA")
    lora_alpha: float = option(64, "LoRA alpha", flag="--alpha", positive=True, group="LoRA / FILA")
    lora_dropout: float = option(
        0.0, "LoRA dropout", minimum=0, check=lambda v: _below_one(v), group="LoRA / FILA", plan=True
    )
    target_modules: list[str] | None = option(
        None, "layer names or suffixes (default: every linear layer but the output head)",
        metavar="NAME[,NAME...]", plan=True, group="LoRA / FILA",
    )  # fmt: skip
    fisher_mode: str = option(
        "per_example", "Fisher estimator for FILA", choices=FISHER_MODES, group="LoRA / FILA", plan=True
    )
    fisher_batch_size: int = option(
        4, "examples per pass of the Fisher estimate", positive=True, plan=True, group="LoRA / FILA"
    )
    fisher_memory: int | str | None = option(
        None, "device memory for one group of Fisher accumulators, e.g. 4GiB (default: what is free)",
        metavar="SIZE", check=parse_bytes, identity=False, plan=True, group="LoRA / FILA",
    )  # fmt: skip
    fila_eps: float = option(1e-5, "epsilon of FILA's Fisher ratio", positive=True, group="LoRA / FILA")
    fila_solver: str = option(
        "truncated", "FILA's rank-r SVD", choices=SOLVERS, plan=True, group="LoRA / FILA"
    )
    stop: str | None = option(
        None, "stopping rule: tofu, extraction, muse, or bounds such as forget.prob<=0.05,retain.rougeL>=0.5",
        flag="--stop-when", metavar="RULE", group="stopping",
    )  # fmt: skip
    eval_every: int | str | None = option(
        None, "evaluate every N optimiser steps or every epoch (default: epoch with --stop-when)",
        metavar="N|epoch", parse=lambda s: int(s) if s.isdigit() else s, check=parse_eval_every,
        group="stopping",
    )  # fmt: skip
    patience: int = option(0, "evaluations to go on after the rule first holds", minimum=0, group="stopping")
    restore: str = option(
        "first", "the state kept among those that satisfy the rule", choices=RESTORE, group="stopping"
    )
    eval_items: int = option(32, "examples per set at each evaluation", positive=True, group="stopping")
    best_by: str | None = option(
        None, "with --restore best: the retain metrics that rank the states", metavar="METRICS",
        group="stopping",
    )  # fmt: skip
    generate_within: float = option(
        0.0, "also generate where every teacher-forced bound misses by at most this fraction", minimum=0,
        identity=False, group="stopping",
    )  # fmt: skip
    unseen: Any = option(None, "text the model never saw (extraction rule)", path=True, group="stopping")
    reference_model: Any = option(
        None, "the retain-only model, same tokenizer (tofu rule)", path=True, group="stopping"
    )
    eval_max_new_tokens: int = option(
        200, "cap of the greedy answers scored by ROUGE-L", positive=True, group="stopping"
    )
    merge: bool = option(
        False, "also write the merged model to OUTPUT/merged", identity=False, group="output", plan=True
    )
    overwrite: bool = option(
        False, "replace the finished run in --output once the new one finishes", identity=False,
        group="output",
    )  # fmt: skip
    resume: bool = option(
        False, "continue the run in --output from its last checkpoint", identity=False, group="output"
    )
    evaluate: bool = option(
        True, "the before/after metrics", flag="--eval", negate=True, identity=False, group="output",
        plan=True,
    )  # fmt: skip
    eval_batch_size: int = option(
        16, "rows per pass of the evaluations", positive=True, identity=False, plan=True, group="output"
    )
    logging_steps: int = option(
        10, "optimiser steps between log lines", positive=True, identity=False, group="output"
    )
    report_to: str | list[str] = option(
        ["none"], f"experiment trackers: {', '.join(TRACKERS)} or none", metavar="NAME[,NAME...]",
        identity=False, group="output",
    )  # fmt: skip
    run_name: str | None = option(
        None, "the run's name in the trackers (default: the output directory's)", identity=False,
        group="output",
    )  # fmt: skip
    callbacks: list[Any] | None = option(
        None, "transformers.TrainerCallback instances added to the Trainer", cli=False, identity=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.rmu_train_layers, (list, tuple)):
            self.rmu_train_layers = [_layer_index(v) for v in self.rmu_train_layers]
        validate(self)
        self.report_to = check_trackers(self.report_to)
        _check_quantised(self)
        if self.overwrite and self.resume:
            raise ValueError("overwrite=True and resume=True exclude each other")
        if isinstance(self.deepspeed, os.PathLike):
            self.deepspeed = os.fspath(self.deepspeed)
        check_single_engine(fsdp=self.fsdp, deepspeed=self.deepspeed)
        if _same_file(self.forget, self.retain):
            raise ValueError(f"forget and retain are the same file ({self.forget}); give two different sets")
        spec = self.method_spec()
        if spec.forget == "rmu" and self.init == "fila":
            raise ValueError(
                "init='fila' does not apply to rmu: FILA fits the adapters to the Fisher information of "
                "the answers' likelihood, RMU steers one layer's activations through a few MLP "
                "down-projections; use init='lora' or 'full'"
            )
        if spec.forget == "rmu" and self.target_modules is not None:
            raise ValueError(
                "rmu trains the MLP down-projections of rmu_train_layers; target_modules does not apply"
            )

    def method_spec(self) -> MethodSpec:
        """The method's terms, weights and beta, the options applied to its preset."""
        return resolve_method(
            self.method, forget_term=self.forget_term, retain_term=self.retain_term,
            forget_weight=self.forget_weight, retain_weight=self.retain_weight, beta=self.beta,
            delta=self.simnpo_delta,
        )  # fmt: skip

    def require(self) -> None:
        """What a run needs beyond valid values: its inputs, and a retain set where the method or FILA
        uses one."""
        require(self)
        spec = self.method_spec()
        if self.forget is None and self.muse is None:
            raise ValueError("forget is required (or --muse DIR, whose raw/forget it trains on)")
        if self.retain is None and self.muse is None and spec.needs_retain:
            raise ValueError(
                f"method {self.method!r} needs a retain set (its retain term is {spec.retain!r})"
            )
        if self.retain is None and self.muse is None and self.init == "fila":
            raise ValueError("init='fila' needs a retain set (relative Fisher information); use init='lora'")


@dataclass
class PlanOptions(Validated):
    """Where ``fastunlearn plan`` plans the run and how it shows the plan."""

    device: str = option("cuda", "the kind of device the run trains on", choices=("cuda", "cpu"))
    world_size: int = option(1, "devices", positive=True)
    engine: str = option("ddp", "how the devices share the model (fsdp, zero3: sharded)", choices=ENGINES)
    terms: bool = option(False, "list each phase's bytes by kind under its row")
    json: bool = option(False, "print the plan as JSON")


@dataclass
class DemoOptions(Validated):
    """The synthetic data and models of ``fastunlearn demo``, and its stopping rule."""

    cache_dir: str | None = option(
        None, "where the data and pre-trained demo models are cached (default: the user cache)", path=True
    )
    size: str = option("small", "'tiny' is a reduced, faster demo used by the tests", choices=DEMO_SIZES)
    stop: bool = option(False, "stop by the tofu rule instead of after 10 epochs")


def check_trackers(value: str | list[str]) -> list[str]:
    """The trackers of ``report_to`` (a name, a comma-separated string or a list) as a list; ``ValueError``
    for an unknown one or one whose package is not installed."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if names == ["none"]:
        return names
    if "none" in names:
        raise ValueError(f"report_to {value!r}: 'none' excludes the other trackers")
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r} in report_to; expected {', '.join(TRACKERS)} or none")
        if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
            raise ValueError(
                f"report_to {name!r} needs the {TRACKERS[name][0]} package: pip install {TRACKERS[name][0]}"
            )
    return list(dict.fromkeys(names))


def _check_quantised(cfg: UnlearnConfig) -> None:
    """What a 4-bit or 8-bit base allows: adapters (LoRA, FILA) on one device or under DDP."""
    if not cfg.quantised:
        return
    which = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit exclude each other; choose one")
    if cfg.init == "full":
        raise ValueError(f"{which}: quantised weights do not train; use init='lora' or init='fila'")
    if cfg.merge:
        raise ValueError(
            f"{which} excludes merge=True (a merged model would bake in the quantisation error): the "
            "adapter loads on the full-precision base, where peft's merge_and_unload merges it"
        )
    if cfg.fsdp is not None or cfg.deepspeed is not None:
        raise ValueError(f"{which} is supported on one device or under DDP, not with fsdp or deepspeed")


def _layer_index(value: Any) -> Any:
    """A layer index given on the command line (a string) as an int."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"rmu_train_layers: {value!r} is not a layer index") from None
    return value


def _below_one(value: float) -> None:
    if not value < 1:
        raise ValueError(f"lora_dropout must be below 1, got {value}")


def _same_file(a: Any, b: Any) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):  # a path that is not there, records, None
        return False
