"""``fastunlearn eval``: score a local model with the TOFU and/or extraction protocols (SPEC §4).

Examples::

    # the retain-only model once: its forget-set truth ratios are the forget-quality reference
    fastunlearn eval retain_model --tofu data/ --save-reference ref_truth_ratios.json
    # any unlearned model (a full model or a peft adapter directory) against it
    fastunlearn eval out/adapter --tofu data/ --reference ref_truth_ratios.json --output eval.json
    # an adapter whose base model has moved since it was trained
    fastunlearn eval out/adapter --base-model /models/llama2-7b-tofu --tofu data/
    # the paper's protocol on TOFU's own files (SPEC §4.1; --template tofu-phi for Phi-1.5)
    fastunlearn eval llama2-7b-tofu --tofu TOFU/ --forget-split forget10 --mode legacy
    # memorised sequences ({"text"} JSON Lines)
    fastunlearn eval gpt-neo-125m --extraction forget_32.jsonl
    # several GPUs: the processes share the items; the main one prints and writes
    torchrun --nproc_per_node 4 -m fastunlearn eval out/adapter --tofu data/ --output eval.json
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fastunlearn.cli import summary
from fastunlearn.cli._args import add_threads_arg, option_flags

__all__ = ["add_parser"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn eval`` on an ``argparse`` sub-parser collection."""
    from fastunlearn.training.data import TEMPLATE_NAMES

    p = subparsers.add_parser(
        "eval",
        help=summary("eval"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="local model directory (a full model or a peft adapter directory)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--base-model",
        default=None,
        help="base model directory of a peft adapter MODEL (default: the one its adapter_config.json "
        "records)",
    )
    src = p.add_argument_group("data (at least one of --tofu, --forget/--retain/..., --extraction)")
    src.add_argument("--tofu", default=None, help="directory of TOFU-format JSON Lines files")
    src.add_argument("--forget-split", default=None, help="forget split to use from --tofu, e.g. forget10")
    for name in ("forget", "retain", "real-authors", "world-facts"):
        src.add_argument(f"--{name}", default=None, help=f"TOFU-format file of the {name} set")
    src.add_argument("--extraction", default=None, help='JSON Lines file of {"text"} sequences')
    tofu = p.add_argument_group("TOFU protocol")
    tofu.add_argument(
        "--mode",
        choices=("full", "legacy"),
        default="full",
        help="legacy: the paper's pipeline token for token (≤300 items, a tofu-* template, TOFU's "
        "tokenisation cut at 200 tokens, greedy to 200 tokens); default %(default)s",
    )
    tofu.add_argument(
        "--template",
        choices=TEMPLATE_NAMES,
        default=None,
        help="prompt template used in training; tofu-*: TOFU's own tokenisation (default: the run's, read "
        "from run_config.json beside an unlearned model's directory; else plain; legacy: tofu-llama2)",
    )
    tofu.add_argument(
        "--reference",
        default=None,
        help="retain-only model's truth ratios (JSON from --save-reference; same --mode and --template)",
    )
    tofu.add_argument("--save-reference", default=None, help="save this model's forget truth ratios (JSON)")
    tofu.add_argument("--max-items", type=int, default=None, help="evaluate at most this many items per set")
    tofu.add_argument("--max-new-tokens", type=int, default=200, help="greedy answer length (full mode)")
    tofu.add_argument("--no-generate", action="store_true", help="skip generation (and ROUGE-L)")
    tofu.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="token cap of a question + answer (default: the run's, as --template; else 512; legacy: 200)",
    )
    ext = p.add_argument_group("extraction protocol")
    ext.add_argument("--n", type=int, default=10, help="n-gram size of EL_n (default: %(default)s)")
    ext.add_argument("--sequence-length", type=int, default=200, help="tokens per sequence (default: 200)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda when available)")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output / --save-reference")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    add_threads_arg(p)
    p.set_defaults(
        func=_main,
        interrupted=lambda args: "interrupted; nothing was written",
        option_flags=option_flags(p, {"reference_truth_ratios": "--reference"}),
    )
    return p


def _training_options(model_dir: str) -> dict:
    """The template and length a ``fastunlearn unlearn`` run trained with, if ``model_dir`` is its output.

    ``unlearn`` writes ``OUTPUT/run_config.json`` beside ``OUTPUT/adapter`` (and ``OUTPUT/merged``,
    ``OUTPUT/model``): scoring with another prompt template would measure a different task.
    """
    import json

    for folder in (model_dir, os.path.join(model_dir, os.pardir)):
        candidate = os.path.join(folder, "run_config.json")
        if os.path.isfile(candidate):
            with open(candidate) as handle:
                options = json.load(handle).get("options", {})
            return {key: options[key] for key in ("template", "max_length") if key in options}
    return {}


def _check_data(args: argparse.Namespace, tofu) -> None:
    """Read every data file before the model loads (a bad line, a missing split fail at once)."""
    from fastunlearn.evaluation.tofu_files import find_tofu_files, read_tofu_file
    from fastunlearn.training.data import read_jsonl

    if tofu is not None:
        files = find_tofu_files(tofu, forget_split=args.forget_split) if isinstance(tofu, str) else tofu
        for path in files.values():
            read_tofu_file(path)
    if args.extraction is not None:
        read_jsonl(args.extraction)


def _main(args: argparse.Namespace) -> int:
    """Under ``torchrun`` / ``accelerate launch`` every process runs this: the checks on every rank (any
    rank's error stops them all), the evaluation shared by the ranks (:mod:`fastunlearn.evaluation`
    gathers the per-item results, every aggregate is computed on all the items), the table and the
    files from the main process alone."""
    from fastunlearn import distributed
    from fastunlearn import evaluation as ev
    from fastunlearn._io import write_json
    from fastunlearn.modeling import load_model_and_tokenizer

    distributed.init_from_env()
    tofu, device = distributed.on_all(lambda: _checked(args))
    model, tokenizer = load_model_and_tokenizer(
        args.model, args.tokenizer, trust_remote_code=args.trust_remote_code, base_model=args.base_model
    )
    model.to(device)
    results = ev.evaluate(
        model,
        tokenizer,
        tofu=tofu,
        extraction=args.extraction,
        tofu_options=dict(
            mode=args.mode,
            template=args.template,
            reference_truth_ratios=args.reference,
            save_reference=args.save_reference,
            overwrite=args.overwrite,
            forget_split=args.forget_split,
            max_items=args.max_items,
            max_new_tokens=args.max_new_tokens,
            generate=not args.no_generate,
            batch_size=args.batch_size,
            max_length=args.max_length,
        ),
        extraction_options=dict(n=args.n, max_length=args.sequence_length, batch_size=args.batch_size),
    )
    _say(ev.format_table(results))
    if args.output is not None:
        record = {"model": os.path.abspath(args.model), **results}
        distributed.on_main(lambda: write_json(args.output, record))
        _say(f"\nResults written to {args.output}")
    return 0


def _say(text: str) -> None:
    """Print from the main process only (every process runs the command under a launcher)."""
    from fastunlearn import distributed

    if distributed.is_main():
        print(text)


def _checked(args: argparse.Namespace) -> tuple[Any, Any]:
    """The TOFU data (a directory or a mapping of set files) and the device, every argument checked
    before the model loads; the run's template and length taken from its ``run_config.json``."""
    from fastunlearn.evaluation.tofu import LEGACY_TEMPLATES
    from fastunlearn.modeling import resolve_device

    sets = {
        name: getattr(args, name)
        for name in ("forget", "retain", "real_authors", "world_facts")
        if getattr(args, name) is not None
    }
    if args.tofu is not None and sets:
        raise ValueError("give --tofu DIR or individual set files (--forget, --retain, ...), not both")
    if args.forget_split is not None and args.tofu is None:
        raise ValueError("--forget-split chooses a split of a --tofu directory; give --tofu DIR")
    tofu = args.tofu if args.tofu is not None else (sets or None)
    if tofu is None and args.extraction is None:
        raise ValueError("nothing to evaluate: give --tofu, --forget/--retain/... or --extraction")
    for path in (args.output, args.save_reference):
        if path is not None and os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; give the path of a JSON file to write")
        if path is not None and os.path.exists(path) and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    device = resolve_device(args.device)
    _check_data(args, tofu)

    trained, taken = _training_options(args.model), []
    legacy = args.mode == "legacy"
    if args.template is None and "template" in trained:
        if not legacy or trained["template"] in LEGACY_TEMPLATES:
            args.template = trained["template"]
            taken.append(f"template {args.template!r}")
        else:
            _say(
                f"the run trained with template {trained['template']!r}, which legacy mode does not "
                f"define (it uses one of {list(LEGACY_TEMPLATES)}; default tofu-llama2)"
            )
    if args.max_length is None:
        args.max_length = trained.get("max_length", 512)
        if "max_length" in trained and not legacy:  # legacy mode cuts at 200 tokens
            taken.append(f"max length {args.max_length}")
    if taken:
        _say(f"{' and '.join(taken)} from the run's run_config.json")
    return tofu, device
