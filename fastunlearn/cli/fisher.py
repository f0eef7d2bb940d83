"""``fastunlearn fisher``: estimate and save the diagonal Fisher information of a model on a data set.

Everything is checked before the weights load (the model built on the ``meta`` device); the estimate is
written group by group as it is computed. Under ``torchrun`` the ranks share the batches and the main
process alone writes.
"""

from __future__ import annotations

import argparse
import math
import os

from fastunlearn.cli.parser import add_command, options_from_args
from fastunlearn.options.fisher import FisherConfig
from fastunlearn.options.schema import require


def add_parser(subparsers) -> argparse.ArgumentParser:
    return add_command(
        subparsers, "fisher", _run_fisher, [FisherConfig], interrupted="interrupted; nothing was written",
        description="Estimate the diagonal empirical Fisher information F = (1/N) Σ_n g_n² of every linear "
        "layer of MODEL (but the output head) on the examples of --data, and save it as safetensors "
        "(load it with fastunlearn.fisher.FisherEstimate.load).",
    )  # fmt: skip


def _check_output(cfg) -> None:
    if os.path.isdir(cfg.output):
        raise IsADirectoryError(f"--output {cfg.output} is a directory; give the .safetensors file to write")
    if os.path.exists(cfg.output) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} exists; pass --overwrite to replace it")


def _run_fisher(args: argparse.Namespace) -> int:
    from fastunlearn import data as fdata
    from fastunlearn.engines import distributed
    from fastunlearn.fisher import save_fisher, select_linear_layers
    from fastunlearn.models.devices import (
        PRECISION_DTYPES,
        resolve_precision,
        to_training_device,
        training_device,
    )
    from fastunlearn.models.loading import load_model_and_tokenizer
    from fastunlearn.training.preflight import check_vocab, on_meta

    cfg = FisherConfig(**options_from_args(args, FisherConfig))
    require(cfg)
    distributed.init_from_env()
    distributed.on_main(lambda: _check_output(cfg))
    dtype = resolve_precision(cfg.dtype, training_device())
    if dtype == "fp16":
        raise ValueError(
            "--dtype fp16: the Fisher estimate squares per-example gradients, which in fp16 flush to zero "
            "below 6e-8 without loss scaling (which it does not apply); use bf16 (same memory) or fp32"
        )
    tokenizer, skeleton, _ = on_meta(cfg)
    examples = fdata.prepare(
        cfg.data, tokenizer, name="data", data_format=cfg.data_format, template=cfg.template,
        max_length=cfg.max_length, allow_download=cfg.allow_download,
    )  # fmt: skip
    check_vocab(skeleton, examples, "data")
    select_linear_layers(skeleton, cfg.target_modules)
    del skeleton

    model, tokenizer = load_model_and_tokenizer(
        cfg.model, tokenizer, **cfg.loading_options(), dtype=PRECISION_DTYPES[dtype]
    )
    to_training_device(model)
    batches = fdata.batches(examples, fdata.pad_id_of(tokenizer), cfg.batch_size)
    written = save_fisher(
        model, batches, cfg.output, overwrite=cfg.overwrite, target_modules=cfg.target_modules,
        mode=cfg.mode, max_memory=cfg.fisher_memory, progress=cfg.progress,
    )  # fmt: skip
    if distributed.is_main():
        total = sum(math.prod(shape) for shape in written.shapes.values())
        print(
            f"{'layers':<12}{len(written.shapes)}\n{'parameters':<12}{total}\n"
            f"{'examples':<12}{written.num_examples}\n{'tokens':<12}{written.num_tokens}\n"
            f"{'mode':<12}{cfg.mode}\nwrote {cfg.output}"
        )
    return 0
