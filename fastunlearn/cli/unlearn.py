"""``fastunlearn unlearn``: :func:`fastunlearn.unlearn` from the command line."""

from __future__ import annotations

import argparse

from fastunlearn.cli._args import add_data_args, add_model_args

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn unlearn``."""
    from fastunlearn.fisher import FISHER_MODES
    from fastunlearn.modeling import PRECISIONS
    from fastunlearn.training.config import INITS, UnlearnConfig
    from fastunlearn.training.methods import METHODS

    d = UnlearnConfig()
    p = subparsers.add_parser(
        "unlearn",
        help="unlearn a forget set from a model (LoRA / FILA / full fine-tuning)",
        description="Unlearn the records of --forget from MODEL while keeping it good on --retain "
        "(IHL + FILA, Cha et al. ICLR 2025). Data: JSON Lines with {question, answer}, {prompt, completion} "
        "or {text} records. Writes OUTPUT/adapter (a peft adapter for the original MODEL), "
        "OUTPUT/metrics.json and OUTPUT/run_config.json.",
        epilog="example: fastunlearn unlearn ./llama2-7b-tofu --forget forget10.json --retain retain90.json "
        "--template llama2 --output out/ --lr 1e-4 --bf16",
    )
    add_model_args(p)
    p.add_argument("--forget", required=True, help="JSON Lines file of the forget set")
    p.add_argument("--retain", default=None, help="JSON Lines file of the retain set (not needed for ga)")
    p.add_argument("--output", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--method", default="ihl", choices=METHODS, help="objective (default: %(default)s)")
    p.add_argument("--init", default="fila", choices=INITS, help="initialisation (default: %(default)s)")
    add_data_args(p)
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
    t.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    lora = p.add_argument_group("LoRA / FILA")
    lora.add_argument("--rank", type=int, default=d.lora_r, help="LoRA rank r (default: %(default)s)")
    lora.add_argument("--alpha", type=float, default=d.lora_alpha, help="LoRA alpha (default: %(default)s)")
    lora.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="layer names or suffixes (default: every linear layer but the output head)",
    )
    lora.add_argument(
        "--fisher-mode",
        default=d.fisher_mode,
        choices=FISHER_MODES,
        help="Fisher estimator for FILA (default: %(default)s)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--merge", action="store_true", help="also write the merged model to OUTPUT/merged")
    out.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --output")
    out.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    out.add_argument("--no-eval", action="store_true", help="skip the before/after metrics")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_unlearn)
    return p


def _run_unlearn(args: argparse.Namespace) -> int:
    from fastunlearn.evaluation.report import summary_table
    from fastunlearn.training.run import unlearn

    result = unlearn(
        args.model,
        args.tokenizer,
        args.forget,
        args.retain,
        method=args.method,
        init=args.init,
        output_dir=args.output,
        template=args.template,
        data_format=args.data_format,
        max_length=args.max_length,
        num_epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay,
        npo_beta=args.npo_beta,
        fused=args.fused,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        lora_r=args.rank,
        lora_alpha=args.alpha,
        target_modules=args.target_modules,
        fisher_mode=args.fisher_mode,
        merge=args.merge,
        overwrite=args.overwrite,
        resume=args.resume,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        allow_download=args.allow_download,
        trust_remote_code=args.trust_remote_code,
    )
    print(summary_table(result.metrics))
    written = [p for p in (result.adapter_path, result.model_path, result.merged_path) if p]
    print("\nwrote " + ", ".join([*written, result.metrics_path, result.run_config_path]))
    return 0
