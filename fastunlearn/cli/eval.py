"""``fastunlearn eval``: score a local model with any of the field's evaluations, in one call and one
model load: TOFU, extraction (MA, EL_10), membership inference, MUSE, lm-evaluation-harness tasks
(WMDP, MMLU, ...), dialogue F1.

Examples::

    # the retain-only model once: its forget-set truth ratios are the forget-quality reference
    fastunlearn eval retain_model --tofu data/ --save-reference ref_truth_ratios.json
    # any unlearned model (a full model or a peft adapter directory) against it
    fastunlearn eval out/adapter --tofu data/ --reference ref_truth_ratios.json --output eval.json
    # the paper's protocol on TOFU's own files (--template tofu-phi for Phi-1.5)
    fastunlearn eval llama2-7b-tofu --tofu TOFU/ --forget-split forget10 --mode legacy
    # memorised sequences ({"text"} records)
    fastunlearn eval gpt-neo-125m --extraction forget_32.jsonl
    # membership inference (AUCs of LOSS, ZLib, Min-K%, Min-K%++) and PrivLeak against a retrained model
    fastunlearn eval out/merged --mia-forget forget.jsonl --mia-holdout holdout.jsonl --retrain-model retrain/
    # MUSE's C1-C4 on a benchmark directory, WMDP and MMLU through lm-evaluation-harness
    fastunlearn eval out/merged --muse news/ --retrain-auc 0.5 --lm-eval wmdp_bio,wmdp_cyber,wmdp_chem,mmlu
    # several GPUs: the processes share the items; the main one prints and writes
    torchrun --nproc_per_node 4 -m fastunlearn eval out/adapter --tofu data/ --output eval.json
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fastunlearn.cli.parser import add_command, options_from_args
from fastunlearn.options.evaluate import EvalConfig
from fastunlearn.options.schema import require


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_command(
        subparsers, "eval", _main, [EvalConfig], interrupted="interrupted; nothing was written",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


def _main(args: argparse.Namespace) -> int:
    """Under a launcher every process runs this: the checks on every rank, the evaluation shared, the
    table and the files from the main process alone."""
    from fastunlearn import evaluation as ev
    from fastunlearn._io import write_json
    from fastunlearn.engines import distributed
    from fastunlearn.models.loading import load_model_and_tokenizer

    cfg = EvalConfig(**options_from_args(args, EvalConfig))
    require(cfg)
    distributed.init_from_env()
    requests, device = distributed.on_all(lambda: _checked(cfg))
    access = dict(trust_remote_code=cfg.trust_remote_code, allow_download=cfg.allow_download)
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, cfg.tokenizer, **cfg.loading_options(), base_model=cfg.base_model
    )
    model.to(device)
    results = ev.evaluate(model, tokenizer, **access, **requests)
    _say(ev.format_table(results))
    if cfg.output is not None:
        model = os.path.abspath(cfg.model) if os.path.exists(cfg.model) else cfg.model  # or a Hub id
        record = {"model": model, **results}
        distributed.on_main(lambda: write_json(cfg.output, record))
        _say(f"\nResults written to {cfg.output}")
    return 0


def _say(text: str) -> None:
    """Print from the main process only (every process runs the command under a launcher)."""
    from fastunlearn.engines import distributed

    if distributed.is_main():
        print(text)


def _checked(cfg) -> tuple[dict[str, Any], Any]:
    """The evaluations asked for and the device, every input checked before the model loads."""
    from fastunlearn.evaluation import check
    from fastunlearn.models.devices import resolve_device
    from fastunlearn.models.loading import model_source

    model_source(
        cfg.model, base_model=cfg.base_model, allow_download=cfg.allow_download, revision=cfg.revision
    )
    names = ("forget", "retain", "real_authors", "world_facts")
    sets = {name: getattr(cfg, name) for name in names if getattr(cfg, name) is not None}
    if cfg.tofu is not None and sets:
        raise ValueError("give --tofu DIR or individual set files (--forget, --retain, ...), not both")
    if cfg.forget_split is not None and cfg.tofu is None:
        raise ValueError("--forget-split chooses a split of a --tofu directory; give --tofu DIR")
    tofu = cfg.tofu if cfg.tofu is not None else (sets or None)  # a directory or a mapping of set files
    requests = cfg.suite_requests(cfg.batch_size)
    if cfg.extraction is not None:
        requests["extraction"] = dict(
            data=cfg.extraction, n=cfg.n, max_length=cfg.sequence_length, batch_size=cfg.batch_size
        )
    if tofu is None and not requests:
        raise ValueError(
            "nothing to evaluate: give --tofu or --forget/--retain/... (TOFU), --extraction, --mia-forget "
            "and --mia-holdout, --muse, --lm-eval or --dialogue"
        )
    for path in (cfg.output, cfg.save_reference):
        if path is not None and os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; give the path of a JSON file to write")
        if path is not None and os.path.exists(path) and not cfg.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    device = resolve_device(cfg.device)
    check(**requests, tofu=None if tofu is None else {"data": tofu, "forget_split": cfg.forget_split})
    if tofu is not None:
        _run_template(cfg)
        requests["tofu"] = dict(
            data=tofu, mode=cfg.mode, template=cfg.template,
            reference_truth_ratios=cfg.reference_truth_ratios, save_reference=cfg.save_reference,
            overwrite=cfg.overwrite, forget_split=cfg.forget_split, max_items=cfg.max_items,
            max_new_tokens=cfg.max_new_tokens, generate=cfg.generate, batch_size=cfg.batch_size,
            max_length=cfg.max_length,
        )  # fmt: skip
    return requests, device


def _run_template(cfg) -> None:
    """``cfg.template`` and ``cfg.max_length`` where not given from the run that trained ``cfg.model``:
    its ``run_config.json`` there or one level up."""
    from fastunlearn.data import TEMPLATE_NAMES
    from fastunlearn.evaluation.tofu import LEGACY_TEMPLATES
    from fastunlearn.models.loading import read_json_object

    trained, taken = {}, []
    for folder in (cfg.model, os.path.join(cfg.model, os.pardir)):
        record = os.path.join(folder, "run_config.json")
        if os.path.isfile(record):
            trained = read_json_object(record).get("options", {})
            break
    legacy = cfg.mode == "legacy"
    if cfg.template is None and "template" in trained:
        if legacy and trained["template"] not in LEGACY_TEMPLATES:
            raise ValueError(
                f"the run trained with template {trained['template']!r}, which legacy mode does not define; "
                f"give --template, one of {list(LEGACY_TEMPLATES)}"
            )
        cfg.template = trained["template"]
        taken.append(f"template {cfg.template!r}")
    if cfg.template is None:
        choices = list(LEGACY_TEMPLATES) if legacy else list(TEMPLATE_NAMES)
        raise ValueError(
            f"{cfg.model} records no prompt template (it is not a fastunlearn run); give --template, one of "
            f"{choices}: the scores depend on it"
        )
    if cfg.max_length is None:
        cfg.max_length = trained.get("max_length", 512)
        if "max_length" in trained and not legacy:  # legacy mode cuts at 200 tokens
            taken.append(f"max length {cfg.max_length}")
    if taken:
        _say(f"{' and '.join(taken)} from the run's run_config.json")
