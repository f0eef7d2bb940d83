"""``fastunlearn unlearn``: :func:`fastunlearn.unlearn` from the command line."""

from __future__ import annotations

import argparse

from fastunlearn.cli._args import add_data_args, add_model_args

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn unlearn``."""
    from fastunlearn.fisher import FISHER_MODES
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
        "--fused-linear",
        action="store_true",
        help="IHL from the last hidden states without materialising the forget batch's logits "
        "(models whose logits are lm_head(decoder(x)))",
    )
    t.add_argument("--bf16", action="store_true", help="load the model in bf16 and train with bf16 autocast")
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
    _add_stopping_args(p, d)
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
        "--unseen", metavar="FILE", help='{"text"} JSON Lines the model never saw (extraction rule)'
    )
    s.add_argument(
        "--reference-model", metavar="DIR", help="the retain-only model, same tokenizer (tofu rule)"
    )


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
        fused_linear=args.fused_linear,
        bf16=args.bf16,
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
        stop=args.stop_when,
        eval_every=args.eval_every,
        patience=args.patience,
        restore=args.restore,
        eval_items=args.eval_items,
        unseen=args.unseen,
        reference_model=args.reference_model,
        progress=not args.no_progress,
        allow_download=args.allow_download,
        trust_remote_code=args.trust_remote_code,
    )
    print(summary_table(result.metrics))
    written = [p for p in (result.adapter_path, result.model_path, result.merged_path) if p]
    stopping = result.metrics.get("stopping")
    if stopping is not None:
        print(_stopping_line(stopping))
        written += [p for p in (stopping["trajectory_csv"], stopping["trajectory_png"]) if p]
    print("\nwrote " + ", ".join([*written, result.metrics_path, result.run_config_path]))
    return 0


def _stopping_line(summary) -> str:
    """One line on where the rule held, where training stopped and which state was kept."""
    if summary["rule"] is None:
        return f"\nevaluated {summary['evaluations']} times during training (no stopping rule)"
    if not summary["satisfied"]:
        return f"\n{summary['rule']}: never satisfied; kept the final state (step {summary['kept_step']})"
    return (
        f"\n{summary['rule']}: first held at step {summary['first_satisfied_step']}, stopped at step "
        f"{summary['stopped_step']}, kept step {summary['kept_step']} ({summary['restore']})"
    )
