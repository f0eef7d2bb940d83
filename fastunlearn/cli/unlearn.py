"""``fastunlearn unlearn``: :func:`fastunlearn.unlearn` from the command line.

The options are :class:`~fastunlearn.training.config.UnlearnConfig`'s, spelled as
:data:`fastunlearn.training.flags.FLAGS` says; their defaults are the paper's recipe for a 7B model.
Small models want other settings: the demo's equivalent command (printed by ``fastunlearn demo`` and
recorded in its ``run_config.json``) shows those it uses.
"""

from __future__ import annotations

import argparse
import os

from fastunlearn.cli import summary
from fastunlearn.cli._args import (
    add_data_args,
    add_model_args,
    add_target_modules_arg,
    add_threads_arg,
    memory_size,
    option_flags,
)

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn unlearn``."""
    from fastunlearn.fisher import FISHER_MODES
    from fastunlearn.modeling import PRECISIONS
    from fastunlearn.training.config import INITS, UnlearnConfig
    from fastunlearn.training.flags import ARGUMENT_FLAGS, FLAGS
    from fastunlearn.training.methods import METHODS

    d = UnlearnConfig()
    p = subparsers.add_parser(
        "unlearn",
        help=summary("unlearn"),
        description="Unlearn the records of --forget from MODEL while keeping it good on --retain "
        "(IHL + FILA, Cha et al. ICLR 2025). Data: JSON Lines with {question, answer}, {prompt, completion} "
        "or {text} records. Writes OUTPUT/adapter (a peft adapter for the original MODEL), "
        "OUTPUT/metrics.json and OUTPUT/run_config.json (with the equivalent command line). Defaults are "
        "the paper's recipe for 7B models; `fastunlearn demo` prints the settings of a small model.",
        epilog="example: fastunlearn unlearn ./llama2-7b-tofu --forget forget10.json --retain retain90.json "
        "--template tofu-llama2 --max-length 500 --output out/ --lr 1e-4 --bf16",
    )
    add_model_args(p)
    p.add_argument("--forget", required=True, help="JSON Lines file of the forget set")
    p.add_argument("--retain", default=None, help="JSON Lines file of the retain set (not needed for ga)")
    p.add_argument(
        "--output",
        required=True,
        help="output directory: absent, empty or holding an interrupted run (a finished run needs "
        "--overwrite or --resume)",
    )
    p.add_argument("--method", default="ihl", choices=METHODS, help="objective (default: %(default)s)")
    p.add_argument("--init", default="fila", choices=INITS, help="initialisation (default: %(default)s)")
    add_data_args(p, max_length=d.max_length)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=d.num_epochs, help="default: %(default)s")
    t.add_argument(
        "--lr", type=float, default=d.learning_rate, help="peak learning rate (default: %(default)s)"
    )
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="forget examples per micro-batch")
    t.add_argument(
        "--grad-accum",
        type=int,
        default=d.gradient_accumulation_steps,
        help="micro-batches per optimiser step (default: %(default)s)",
    )
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="default: %(default)s")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    t.add_argument("--npo-beta", type=float, default=d.npo_beta, help="NPO's beta (default: %(default)s)")
    t.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compute the losses from the last hidden states without the [B, T, V] logits: by default "
        "wherever the architecture allows (else the logits path, with a warning); --fused makes that an "
        "error, --no-fused always takes the logits path",
    )
    t.add_argument(
        "--precision",
        default=d.precision,
        choices=PRECISIONS,
        help="compute precision: auto = bf16 on CUDA GPUs of compute capability 8.0+, fp32 elsewhere; "
        "fp16 is loss-scaled and CUDA only (default: %(default)s)",
    )
    t.add_argument(
        "--bf16", dest="precision", action="store_const", const="bf16", help="the same as --precision bf16"
    )
    t.add_argument(
        "--gradient-checkpointing", action="store_true", help="trade compute for activation memory"
    )
    t.add_argument(
        "--no-memory-check",
        action="store_true",
        help="run even if the memory plan (`fastunlearn plan`) predicts more than the device has; "
        "by default such a run is refused, with the plan's table, before the weights load",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    add_threads_arg(t)
    t.add_argument(
        "--fsdp",
        metavar="WORDS",
        default=None,
        help="under torchrun / accelerate launch, shard the model over the processes with FSDP2: "
        "full_shard or shard_grad_op, plus auto_wrap (one unit per transformer block) and offload, "
        'e.g. --fsdp "full_shard auto_wrap" (LoRA / FILA runs; no --resume, --stop-when, --eval-every)',
    )
    p.add_argument(
        "--deepspeed",
        metavar="CONFIG.json",
        default=None,
        help="train under DeepSpeed ZeRO with this config (ZeRO-3: the model is loaded sharded); values "
        'that contradict the options (batch sizes, precision) are refused, "auto" ones filled in; '
        'needs pip install "fastunlearn[deepspeed]"',
    )
    lora = p.add_argument_group("LoRA / FILA")
    lora.add_argument("--rank", type=int, default=d.lora_r, help="LoRA rank r (default: %(default)s)")
    lora.add_argument("--alpha", type=float, default=d.lora_alpha, help="LoRA alpha (default: %(default)s)")
    add_target_modules_arg(lora)
    lora.add_argument(
        "--fisher-mode",
        default=d.fisher_mode,
        choices=FISHER_MODES,
        help="Fisher estimator for FILA (default: %(default)s)",
    )
    lora.add_argument(
        "--fisher-batch-size",
        type=int,
        default=d.fisher_batch_size,
        help="examples per pass of the Fisher estimate (default: %(default)s)",
    )
    lora.add_argument(
        "--fisher-memory",
        type=memory_size,
        default=None,
        metavar="SIZE",
        help="device memory for the Fisher accumulators of one group of layers, e.g. 4GiB or 2GB "
        "(default: what is free after the model and a pass's activations)",
    )
    _add_stopping_args(p, d)
    out = p.add_argument_group("output")
    out.add_argument("--merge", action="store_true", help="also write the merged model to OUTPUT/merged")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the finished run in --output; it is kept until the new run finishes",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output (an interrupted one: from its last checkpoint)",
    )
    out.add_argument("--no-eval", action="store_true", help="skip the before/after metrics")
    out.add_argument(
        "--eval-batch-size",
        type=int,
        default=d.eval_batch_size,
        help="rows per pass of the before/after metrics (default: %(default)s)",
    )
    out.add_argument(
        "--logging-steps", type=int, default=d.logging_steps, help="optimiser steps between log lines"
    )
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(
        func=_run_unlearn,
        interrupted=_interrupted,
        option_flags=option_flags(p, {**FLAGS, **ARGUMENT_FLAGS}),
    )
    return p


def _add_stopping_args(p: argparse.ArgumentParser, d) -> None:
    from fastunlearn.evaluation.stopping import RESTORE, metric_help

    s = p.add_argument_group(
        "stopping",
        "evaluate during training on bounded subsets, stop when a rule holds, keep that state; "
        "writes OUTPUT/trajectory.csv and OUTPUT/trajectory.png",
    )
    s.add_argument(
        "--stop-when",
        metavar="RULE",
        default=None,
        help="'tofu' (forget accuracy and ROUGE-L at or below the retain-only model's: --reference-model, "
        "or tofu:acc=A,rougeL=R), 'extraction' (forget MA and EL10 below the model's on unseen text: "
        "--unseen, or extraction:ma=M,el10=E), or bounds joined by ',' such as "
        f"forget.prob<=0.05,retain.rougeL>=0.5 on SET.KIND metrics, SET forget|retain; {metric_help()}",
    )
    s.add_argument(
        "--eval-every",
        metavar="N|epoch",
        default=None,
        help="evaluate every N optimiser steps or every epoch (default: epoch with --stop-when; "
        "without a rule, records the trajectory only)",
    )
    s.add_argument(
        "--patience",
        metavar="K",
        type=int,
        default=d.patience,
        help="evaluations to go on after the rule first holds (default: %(default)s)",
    )
    s.add_argument(
        "--restore",
        choices=RESTORE,
        default=d.restore,
        help="the state kept among those that satisfy the rule: the first, the best retain score, or "
        "the last (default: %(default)s; best/last need --patience >= 1)",
    )
    s.add_argument(
        "--eval-items",
        metavar="N",
        type=int,
        default=d.eval_items,
        help="examples per set at each evaluation (default: %(default)s)",
    )
    s.add_argument(
        "--best-by",
        metavar="METRICS",
        default=d.best_by,
        help="--restore best: the retain metrics that rank the states, e.g. retain.prob,retain.acc "
        "(teacher-forced only: no retain generation past the crossing; default: retain prob, acc and "
        "rougeL, as the data allow)",
    )
    s.add_argument(
        "--generate-within",
        metavar="FRACTION",
        type=float,
        default=d.generate_within,
        help="also generate (rougeL, el10) where every teacher-forced bound of the rule misses by at most "
        "this fraction of its value, to see them in the trajectory around the crossing (default: "
        "%(default)s: only where they can decide, i.e. where the teacher-forced bounds hold)",
    )
    s.add_argument(
        "--unseen", metavar="FILE", help='{"text"} JSON Lines the model never saw (extraction rule)'
    )
    s.add_argument(
        "--reference-model", metavar="DIR", help="the retain-only model, same tokenizer (tofu rule)"
    )


def _run_unlearn(args: argparse.Namespace) -> int:
    from fastunlearn.evaluation.report import stopping_line, summary_table
    from fastunlearn.training.flags import options_from_args
    from fastunlearn.training.run import unlearn

    result = unlearn(
        args.model,
        args.tokenizer,
        args.forget,
        args.retain,
        method=args.method,
        init=args.init,
        output_dir=args.output,
        **options_from_args(args),
    )
    print(summary_table(result.metrics))
    written = [p for p in (result.adapter_path, result.model_path, result.merged_path) if p]
    stopping = result.metrics.get("stopping")
    if stopping is not None:
        print(stopping_line(stopping))
        # named in the published run (the callback wrote them where the run was built)
        files = (stopping["trajectory_csv"], stopping["trajectory_png"])
        written += [os.path.join(result.output_dir, os.path.basename(p)) for p in files if p]
    print("\nwrote " + ", ".join([*written, result.metrics_path, result.run_config_path]))
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    from fastunlearn.training.outputs import interrupted_message

    return interrupted_message(args.output)
