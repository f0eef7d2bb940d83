"""Options and result of :func:`fastunlearn.unlearn`: :class:`UnlearnConfig`, :class:`UnlearnResult`.

The defaults are the paper's recipe (Cha et al. 2025 §4; SPEC §3.2) where the paper has one: LoRA
r = 32, alpha = 64, dropout 0 on every linear layer but the output head; AdamW with weight decay 0.01;
an effective batch of 32; one epoch of linear warm-up, then linear decay. Every option is checked when
the config is made, so a bad value fails before a model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fastunlearn.fisher import FISHER_MODES, SOLVERS, parse_bytes
from fastunlearn.modeling import PRECISIONS
from fastunlearn.ops._backend import BACKENDS
from fastunlearn.training import data as fdata

INITS = ("fila", "lora", "full")

__all__ = ["INITS", "UnlearnConfig", "UnlearnResult"]


@dataclass
class UnlearnConfig:
    """Options of :func:`unlearn` (paper defaults where the paper has one)."""

    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: every nn.Linear but the output head
    learning_rate: float = 1e-4
    num_epochs: float = 5.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 8  # effective batch 32, as the paper's
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_length: int = 512
    template: str = "plain"
    data_format: str = "auto"
    npo_beta: float = 0.1
    # Kernels of the loss terms (fastunlearn.patch's backend): "auto", "triton" or "torch".
    ihl_backend: str = "auto"
    # The loss terms from the last hidden states without the [B, T, V] logits (fastunlearn.patch):
    # None: wherever the architecture allows, else the logits path with one warning; True: fused or an
    # error; False: the logits path.
    fused: bool | None = None
    fisher_mode: str = "per_example"
    fisher_batch_size: int = 4
    # Bytes (int, or a string like "4GiB") the forget and retain Fisher accumulators of one group of layers
    # may take; None: what the device has free after the model and a pass's activations (fila_row_weights).
    fisher_memory: int | str | None = None
    fila_eps: float = 1e-5
    fila_solver: str = "truncated"
    seed: int = 0
    # "auto" (bf16 on CUDA sm_80+, fp32 elsewhere), "bf16", "fp16" (loss-scaled, CUDA) or "fp32":
    # fastunlearn.training.precision says what each loads and refuses.
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # Refuse, before the weights load, a run whose memory plan does not fit the device
    # (fastunlearn.training.memory_check); False runs it anyway.
    memory_check: bool = True
    merge: bool = False
    overwrite: bool = False
    resume: bool = False
    evaluate: bool = True
    eval_batch_size: int = 16
    logging_steps: int = 10
    progress: bool = True
    trust_remote_code: bool = False
    allow_download: bool = False
    # transformers.TrainerCallback instances added to the Trainer (e.g. per-epoch evaluation and stopping,
    # fastunlearn.evaluation); recorded in run_config.json by class name.
    callbacks: list[Any] | None = None
    # Evaluation during training and stopping rules (fastunlearn.evaluation.stopping; issue 14), checked
    # with the data's record formats before the model loads (fastunlearn.training.stopping_setup).
    stop: str | None = None  # a rule: "tofu", "extraction", "forget.prob<=0.05,retain.rougeL>=0.5", ...
    eval_every: int | str | None = None  # optimiser steps or "epoch" (default with a rule)
    patience: int = 0  # evaluations to go on after the rule first holds
    restore: str = "first"  # the state kept: "first", "best" (retain score) or "last" that satisfies it
    eval_items: int = 32  # examples per set at each evaluation
    # Generate (ROUGE-L, EL10) also where the rule's teacher-forced bounds miss by at most this fraction
    # of their values; 0: only where generation can decide (fastunlearn.evaluation.stopping.NEAR).
    generate_within: float = 0.0
    # restore="best": the retain metrics that rank the states ("retain.prob,retain.acc"); None: prob,
    # acc and ROUGE-L (fastunlearn.evaluation.stopping.DEFAULT_RETAIN_METRICS), as the data allow.
    best_by: str | None = None
    unseen: str | os.PathLike | list[str] | None = None  # the extraction rule's unseen text
    reference_model: str | os.PathLike | nn.Module | None = None  # the tofu rule's retain-only model
    eval_max_new_tokens: int = 200  # cap of the greedy answers scored by ROUGE-L
    # Shard the model over the ranks for training with FSDP2 (fastunlearn.training.fsdp): transformers'
    # --fsdp words, e.g. "full_shard auto_wrap"; None: not sharded (DDP under several processes).
    fsdp: str | None = None
    # A DeepSpeed config (JSON file or dict): Trainer trains under DeepSpeed ZeRO, ZeRO-3 with the model
    # created sharded (fastunlearn.training.deepspeed_setup); checked against the options before loading.
    deepspeed: str | os.PathLike | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        positive = (
            "lora_r",
            "batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "fisher_batch_size",
            "eval_batch_size",
            "logging_steps",
            "eval_items",
            "eval_max_new_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "num_epochs", "npo_beta", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("warmup_epochs and weight_decay must be >= 0 and lora_dropout in [0, 1)")
        if self.template not in fdata.TEMPLATE_NAMES:
            raise ValueError(
                f"unknown template {self.template!r}; expected one of {list(fdata.TEMPLATE_NAMES)}"
            )
        if self.data_format not in ("auto", *fdata.FORMATS):
            raise ValueError(
                f"unknown data format {self.data_format!r}; expected 'auto' or one of {list(fdata.FORMATS)}"
            )
        for name, allowed in (
            ("fisher_mode", FISHER_MODES),
            ("fila_solver", SOLVERS),
            ("ihl_backend", tuple(b for b in BACKENDS if b != "reference")),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {list(allowed)}")
        if self.fisher_memory is not None:
            parse_bytes(self.fisher_memory)  # a bad size fails here, before any model is loaded
        if self.fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {self.fused!r}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite=True and resume=True exclude each other")
        if self.fsdp is not None:
            from fastunlearn.training.fsdp import check_single_engine, parse_fsdp

            parse_fsdp(self.fsdp)
            check_single_engine(fsdp=self.fsdp, deepspeed=self.deepspeed)
        if isinstance(self.deepspeed, os.PathLike):  # recorded in run_config.json as a string
            self.deepspeed = os.fspath(self.deepspeed)
        if self.deepspeed is not None and not isinstance(self.deepspeed, (str, dict)):
            raise TypeError(
                f"deepspeed must be a JSON file path or a dict, got {type(self.deepspeed).__name__}"
            )


@dataclass
class UnlearnResult:
    """What :func:`unlearn` produced: the trained model, its metrics, and the paths written."""

    model: nn.Module
    tokenizer: Any
    output_dir: str
    metrics: dict[str, Any]
    metrics_path: str
    run_config_path: str
    adapter_path: str | None = None
    model_path: str | None = None
    merged_path: str | None = None
    fisher_paths: dict[str, str] = field(default_factory=dict)
