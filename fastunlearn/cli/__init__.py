"""The ``fastunlearn`` command: ``unlearn``, ``fisher``, ``demo`` (and the subcommands other modules add).

Every subcommand lives in a module exposing ``add_parser(subparsers)``, which registers it on the
``argparse`` sub-parser collection and sets ``func`` (``args -> exit code``) as its default. Adding a
subcommand is one line in :data:`SUBCOMMANDS`. User errors (bad data, a missing model, a non-empty
output directory) are printed as one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

# "module:function" registering one or more subcommands; imported when the parser is built.
SUBCOMMANDS = (
    "fastunlearn.cli:add_unlearn_parser",
    "fastunlearn.cli:add_fisher_parser",
    "fastunlearn.demo:add_parser",
    "fastunlearn.cli_eval:add_parser",
)
# Errors that mean "the user asked for something impossible", reported without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local model directory (Hugging Face format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="allow MODEL to be a Hugging Face Hub id, downloaded if not cached",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own Python code to run"
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from fastunlearn.data import FORMATS, TEMPLATE_NAMES

    p.add_argument(
        "--template",
        default="plain",
        choices=TEMPLATE_NAMES,
        help="prompt template of question/answer data (default: %(default)s)",
    )
    p.add_argument(
        "--format",
        dest="data_format",
        default="auto",
        choices=("auto", *FORMATS),
        help="record format of the JSON Lines files (default: detected per file)",
    )
    p.add_argument("--max-length", type=int, default=512, help="token cap per example (default: %(default)s)")


def add_unlearn_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn unlearn``."""
    from fastunlearn.fisher import MODES
    from fastunlearn.methods import METHODS
    from fastunlearn.trainer import INITS, UnlearnConfig

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
    _add_model_args(p)
    p.add_argument("--forget", required=True, help="JSON Lines file of the forget set")
    p.add_argument("--retain", default=None, help="JSON Lines file of the retain set (not needed for ga)")
    p.add_argument("--output", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--method", default="ihl", choices=METHODS, help="objective (default: %(default)s)")
    p.add_argument("--init", default="fila", choices=INITS, help="initialisation (default: %(default)s)")
    _add_data_args(p)
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
        choices=MODES,
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
    from fastunlearn.trainer import unlearn

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
        progress=not args.no_progress,
        allow_download=args.allow_download,
        trust_remote_code=args.trust_remote_code,
    )
    print(summary_table(result.metrics))
    written = [p for p in (result.adapter_path, result.model_path, result.merged_path) if p]
    print("\nwrote " + ", ".join([*written, result.metrics_path, result.run_config_path]))
    return 0


def summary_table(metrics: dict[str, Any]) -> str:
    """Before/after table of every metric on forget and retain (or the training summary alone)."""
    lines = []
    if "before" in metrics and "after" in metrics:
        lines.append(f"{'set':<8}{'metric':<10}{'before':>10}{'after':>10}{'after/before':>14}")
        for split, before in metrics["before"].items():
            for key, b in before.items():
                a = metrics["after"][split][key]
                ratio = f"{a / b:.2f}" if b else "-"
                lines.append(f"{split:<8}{key:<10}{b:>10.4f}{a:>10.4f}{ratio:>14}")
    train = metrics.get("train", {})
    if train:
        lines.append(
            f"training: {train['global_step']} steps, final mean loss {train['loss']:.4f}, "
            f"{train['runtime_s']:.1f} s"
        )
    return "\n".join(lines)


def add_fisher_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn fisher``."""
    from fastunlearn.fisher import MODES

    p = subparsers.add_parser(
        "fisher",
        help="estimate the diagonal Fisher information of a model's linear layers on a data set",
        description="Estimate the diagonal empirical Fisher information F = (1/N) Σ_n g_n² of every linear "
        "layer of MODEL (but the output head) on the examples of --data, and save it as safetensors "
        "(load it with fastunlearn.fisher.FisherEstimate.load).",
    )
    _add_model_args(p)
    p.add_argument("--data", required=True, help="JSON Lines file of the examples")
    p.add_argument("--output", required=True, help="output .safetensors file")
    _add_data_args(p)
    p.add_argument(
        "--mode",
        default="per_example",
        choices=MODES,
        help="estimator (default: %(default)s)",
    )
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        help="layer names or suffixes (default: every linear layer but the output head)",
    )
    p.add_argument(
        "--batch-size", type=int, default=4, help="examples per forward pass (default: %(default)s)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_fisher)
    return p


def _run_fisher(args: argparse.Namespace) -> int:
    from fastunlearn import data as fdata
    from fastunlearn.fisher import estimate_fisher
    from fastunlearn.trainer import load_model_and_tokenizer, to_training_device

    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    model, tokenizer = load_model_and_tokenizer(
        args.model,
        args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        allow_download=args.allow_download,
    )
    to_training_device(model)  # on a GPU machine the Fisher kernel runs there
    examples = fdata.prepare(
        args.data,
        tokenizer,
        name="data",
        data_format=args.data_format,
        template=args.template,
        max_length=args.max_length,
    )
    batches = fdata.batches(examples, fdata.pad_id_of(tokenizer), args.batch_size)
    estimate = estimate_fisher(
        model, batches, target_modules=args.target_modules, mode=args.mode, progress=not args.no_progress
    )
    estimate.save(args.output, overwrite=args.overwrite)
    total = sum(t.numel() for t in estimate.values())
    print(
        f"{'layers':<12}{len(estimate)}\n{'parameters':<12}{total}\n{'examples':<12}{estimate.num_examples}\n"
        f"{'tokens':<12}{estimate.num_tokens}\n{'mode':<12}{args.mode}\nwrote {args.output}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fastunlearn`` parser with every subcommand of :data:`SUBCOMMANDS`."""
    from fastunlearn import __version__

    parser = argparse.ArgumentParser(
        prog="fastunlearn",
        description="LLM unlearning with Inverted Hinge Loss and Fisher-initialised LoRA.",
    )
    parser.add_argument("--version", action="version", version=f"fastunlearn {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in SUBCOMMANDS:
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastunlearn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):
        # transformers' own bars (loading and writing checkpoints) obey a global switch, not ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"fastunlearn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
