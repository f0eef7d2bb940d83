"""The options of ``fastunlearn unlearn`` / :func:`fastunlearn.unlearn`: :class:`UnlearnConfig`.

Defaults are the recipe of Cha et al. (ICLR 2025, arXiv 2408.06621) for 7B models: LoRA r = 32,
alpha = 64, dropout 0 on every linear layer but the output head; AdamW with weight decay 0.01; an
effective batch of 32; one epoch of linear warm-up, then linear decay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fastunlearn.engines.fsdp import check_single_engine, parse_fsdp
from fastunlearn.evaluation.stopping.controller import RESTORE
from fastunlearn.evaluation.stopping.parsing import parse_eval_every
from fastunlearn.fisher import FISHER_MODES, SOLVERS, parse_bytes
from fastunlearn.methods.objectives import METHODS, NEEDS_RETAIN
from fastunlearn.models.precision import PRECISIONS
from fastunlearn.ops._backend import BACKENDS
from fastunlearn.options.common import DataShape, ModelAccess, RunControl
from fastunlearn.options.schema import option, require, validate

INITS = ("fila", "lora", "full")
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "reference")

__all__ = ["INITS", "UnlearnConfig"]


def _memory_size(value: Any) -> None:
    parse_bytes(value)


def _eval_every(value: Any) -> None:
    parse_eval_every(value)


@dataclass
class UnlearnConfig(RunControl, DataShape, ModelAccess):
    """Every option of an unlearning run (defaults: the paper's recipe where it has one)."""

    forget: Any = option(
        None, "the forget set: a data file or, in Python, records", path=True, group="data", required=True
    )
    retain: Any = option(None, "the retain set (not needed by ga)", path=True, group="data")
    output_dir: Any = option(
        None,
        "output directory: absent, empty or holding an interrupted run (a finished run needs --overwrite "
        "or --resume)",
        flag="--output",
        path="output",
        identity=False,
        required=True,
    )
    method: str = option("ihl", "the unlearning objective", choices=METHODS, plan=True)
    init: str = option("fila", "adapter initialisation (full: full fine-tuning)", choices=INITS, plan=True)
    # training
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
    npo_beta: float = option(0.1, "NPO's beta", positive=True, group="training")
    seed: int = option(0, "seed of the pairing, LoRA's initialisation and training", group="training")
    precision: str = option(
        "auto",
        "compute precision: auto = bf16 on CUDA GPUs of compute capability 8.0+, fp32 elsewhere; fp16 is "
        "loss-scaled and CUDA only",
        choices=PRECISIONS,
        consts={"--bf16": "bf16"},
        plan=True,
        group="training",
    )
    fused: bool | None = option(
        None,
        "compute the losses from the last hidden states without the [B, T, V] logits: by default wherever "
        "the architecture allows (else the logits path, with a warning); --fused makes that an error, "
        "--no-fused always takes the logits path",
        identity=False,
        plan=True,
        group="training",
    )
    ihl_backend: str = option(
        "auto",
        "kernels of the loss terms: auto = Triton on CUDA, PyTorch elsewhere",
        flag="--kernel-backend",
        choices=KERNEL_BACKENDS,
        identity=False,
        group="training",
    )
    gradient_checkpointing: bool = option(
        False, "trade compute for activation memory", plan=True, group="training"
    )
    memory_check: bool = option(
        True,
        "refuse, before the weights load, a run whose memory plan (`fastunlearn plan`) exceeds the device",
        negate=True,
        identity=False,
        group="training",
    )
    fsdp: str | None = option(
        None,
        "under torchrun / accelerate launch, shard the model with FSDP2: full_shard or shard_grad_op, plus "
        'auto_wrap and offload, e.g. "full_shard auto_wrap"',
        metavar="WORDS",
        check=lambda v: parse_fsdp(v) and None,
        group="training",
    )
    deepspeed: Any = option(
        None,
        "train under DeepSpeed ZeRO with this config (a JSON file; in Python also a dict); values that "
        'contradict the options are refused, "auto" ones filled in',
        metavar="CONFIG.json",
        path=True,
        group="training",
    )
    # LoRA / FILA
    lora_r: int = option(32, "LoRA rank r", flag="--rank", positive=True, plan=True, group="LoRA / FILA")
    lora_alpha: float = option(64, "LoRA alpha", flag="--alpha", positive=True, group="LoRA / FILA")
    lora_dropout: float = option(
        0.0, "LoRA dropout", minimum=0, check=lambda v: _below_one(v), group="LoRA / FILA", plan=True
    )
    target_modules: list[str] | None = option(
        None,
        "layer names or suffixes, comma-separated (default: every linear layer but the output head)",
        metavar="NAME[,NAME...]",
        plan=True,
        group="LoRA / FILA",
    )
    fisher_mode: str = option(
        "per_example", "Fisher estimator for FILA", choices=FISHER_MODES, group="LoRA / FILA", plan=True
    )
    fisher_batch_size: int = option(
        4, "examples per pass of the Fisher estimate", positive=True, plan=True, group="LoRA / FILA"
    )
    fisher_memory: int | str | None = option(
        None,
        "device memory for the Fisher accumulators of one group of layers, e.g. 4GiB (default: what is free "
        "after the model and a pass's activations)",
        metavar="SIZE",
        check=_memory_size,
        identity=False,
        plan=True,
        group="LoRA / FILA",
    )
    fila_eps: float = option(1e-5, "epsilon of FILA's Fisher ratio", positive=True, group="LoRA / FILA")
    fila_solver: str = option(
        "truncated",
        "FILA's rank-r SVD: exact truncated, full, or randomised",
        choices=SOLVERS,
        plan=True,
        group="LoRA / FILA",
    )
    # evaluation during training and stopping
    stop: str | None = option(
        None,
        "'tofu' (forget accuracy and ROUGE-L at or below the retain-only model's: --reference-model, or "
        "tofu:acc=A,rougeL=R), 'extraction' (forget MA and EL10 below the model's on unseen text: --unseen, "
        "or extraction:ma=M,el10=E), or bounds such as forget.prob<=0.05,retain.rougeL>=0.5",
        flag="--stop-when",
        metavar="RULE",
        group="stopping",
    )
    eval_every: int | str | None = option(
        None,
        "evaluate every N optimiser steps or every epoch (default: epoch with --stop-when)",
        metavar="N|epoch",
        parse=lambda s: int(s) if s.isdigit() else s,
        check=_eval_every,
        group="stopping",
    )
    patience: int = option(0, "evaluations to go on after the rule first holds", minimum=0, group="stopping")
    restore: str = option(
        "first", "the state kept among those that satisfy the rule", choices=RESTORE, group="stopping"
    )
    eval_items: int = option(32, "examples per set at each evaluation", positive=True, group="stopping")
    best_by: str | None = option(
        None,
        "--restore best: the retain metrics that rank the states, e.g. retain.prob,retain.acc (default: "
        "retain prob, acc and rougeL, as the data allow)",
        metavar="METRICS",
        group="stopping",
    )
    generate_within: float = option(
        0.0,
        "also generate (rougeL, el10) where every teacher-forced bound misses by at most this fraction",
        minimum=0,
        identity=False,
        group="stopping",
    )
    unseen: Any = option(
        None, "text the model never saw, for the extraction rule", path=True, group="stopping"
    )
    reference_model: Any = option(
        None, "the retain-only model, same tokenizer (tofu rule)", path=True, group="stopping"
    )
    eval_max_new_tokens: int = option(
        200, "cap of the greedy answers scored by ROUGE-L", positive=True, group="stopping"
    )
    # output
    merge: bool = option(
        False, "also write the merged model to OUTPUT/merged", identity=False, group="output", plan=True
    )
    overwrite: bool = option(
        False,
        "replace the finished run in --output; kept until the new run finishes",
        identity=False,
        group="output",
    )
    resume: bool = option(
        False, "continue the run in --output from its last checkpoint", identity=False, group="output"
    )
    evaluate: bool = option(
        True,
        "the before/after metrics",
        flag="--eval",
        negate=True,
        identity=False,
        group="output",
        plan=True,
    )
    eval_batch_size: int = option(
        16, "rows per pass of the evaluations", positive=True, identity=False, plan=True, group="output"
    )
    logging_steps: int = option(
        10, "optimiser steps between log lines", positive=True, identity=False, group="output"
    )
    callbacks: list[Any] | None = option(
        None, "transformers.TrainerCallback instances added to the Trainer", cli=False, identity=False
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.overwrite and self.resume:
            raise ValueError("overwrite=True and resume=True exclude each other")
        if isinstance(self.deepspeed, os.PathLike):
            self.deepspeed = os.fspath(self.deepspeed)
        check_single_engine(fsdp=self.fsdp, deepspeed=self.deepspeed)
        if _same_file(self.forget, self.retain):
            raise ValueError(f"forget and retain are the same file ({self.forget}); give two different sets")

    def require(self) -> None:
        """What a run needs beyond valid values: its inputs, and a retain set where the method or FILA
        uses one."""
        require(self)
        if self.retain is None and self.method in NEEDS_RETAIN:
            raise ValueError(f"method {self.method!r} needs a retain set")
        if self.retain is None and self.init == "fila":
            raise ValueError("init='fila' needs a retain set (relative Fisher information); use init='lora'")


def _below_one(value: float) -> None:
    if not value < 1:
        raise ValueError(f"lora_dropout must be below 1, got {value}")


def _same_file(a: Any, b: Any) -> bool:
    paths = [x for x in (a, b) if isinstance(x, (str, os.PathLike))]
    return (
        len(paths) == 2 and os.path.exists(paths[0]) and os.path.exists(paths[1]) and os.path.samefile(*paths)
    )
