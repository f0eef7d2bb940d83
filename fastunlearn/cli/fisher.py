"""``fastunlearn fisher``: estimate and save the diagonal Fisher information of a model on a data set.

The output path, the model directory, the tokenizer, the data and the target modules (on the model
built on the ``meta`` device) are checked before the weights load. The estimate is written into the
output file group by group as it is computed (:func:`fastunlearn.fisher.save_fisher`): host memory
holds one layer of it at a time, the device one group's accumulators (``--fisher-memory``).
"""

from __future__ import annotations

import argparse
import math
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
    """Register ``fastunlearn fisher``."""
    from fastunlearn.fisher import FISHER_MODES
    from fastunlearn.modeling import PRECISIONS

    p = subparsers.add_parser(
        "fisher",
        help=summary("fisher"),
        description="Estimate the diagonal empirical Fisher information F = (1/N) Σ_n g_n² of every linear "
        "layer of MODEL (but the output head) on the examples of --data, and save it as safetensors "
        "(load it with fastunlearn.fisher.FisherEstimate.load).",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSON Lines file of the examples")
    p.add_argument("--output", required=True, help="output .safetensors file")
    add_data_args(p)
    p.add_argument(
        "--mode",
        default="per_example",
        choices=FISHER_MODES,
        help="estimator (default: %(default)s)",
    )
    add_target_modules_arg(p)
    p.add_argument(
        "--batch-size", type=int, default=4, help="examples per forward pass (default: %(default)s)"
    )
    add_threads_arg(p)
    p.add_argument(
        "--fisher-memory",
        type=memory_size,
        default=None,
        metavar="SIZE",
        help="device memory for the accumulators of one group of layers, e.g. 4GiB or 2GB; the data is "
        "passed once per group (default: what is free after the model and a pass's activations)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=PRECISIONS,
        help="dtype the model is loaded in: auto = bf16 on CUDA GPUs of compute capability 8.0+, fp32 "
        "elsewhere; fp16 is refused (its gradients underflow without loss scaling) (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(
        func=_run_fisher,
        interrupted=lambda args: f"interrupted; nothing was written to {args.output}",
        option_flags=option_flags(p, {"output_dir": "--output"}),
    )
    return p


def _run_fisher(args: argparse.Namespace) -> int:
    from fastunlearn.fisher import save_fisher
    from fastunlearn.fisher.layers import select_linear_layers
    from fastunlearn.modeling import (
        PRECISION_DTYPES,
        load_config,
        load_model_and_tokenizer,
        model_skeleton,
        resolve_model,
        resolve_precision,
        to_training_device,
        training_device,
    )
    from fastunlearn.training import data as fdata
    from fastunlearn.training.preflight import check_vocab

    if os.path.isdir(args.output):
        raise IsADirectoryError(f"--output {args.output} is a directory; give the .safetensors file to write")
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    dtype = resolve_precision(args.dtype, training_device())
    if dtype == "fp16":
        raise ValueError(
            "--dtype fp16: the Fisher estimate squares per-example gradients, which in fp16 flush to zero "
            "below 6e-8 without loss scaling (which it does not apply); use bf16 (same memory) or fp32"
        )
    access = dict(trust_remote_code=args.trust_remote_code, allow_download=args.allow_download)
    source, tokenizer = resolve_model(args.model, args.tokenizer, **access)
    examples = fdata.prepare(
        args.data,
        tokenizer,
        name="data",
        data_format=args.format,
        template=args.template,
        max_length=args.max_length,
    )
    skeleton = model_skeleton(
        load_config(source.base or source.path, **access), trust_remote_code=args.trust_remote_code
    )
    check_vocab(skeleton, examples, "data")
    select_linear_layers(skeleton, args.target_modules)
    del skeleton

    model, tokenizer = load_model_and_tokenizer(
        args.model, tokenizer, **access, dtype=PRECISION_DTYPES[dtype]
    )
    to_training_device(model)  # on a GPU machine the Fisher kernel runs there
    batches = fdata.batches(examples, fdata.pad_id_of(tokenizer), args.batch_size)
    # Streamed into the file as the groups of layers finish: the estimate is never whole in memory.
    written = save_fisher(
        model,
        batches,
        args.output,
        overwrite=args.overwrite,
        target_modules=args.target_modules,
        mode=args.mode,
        max_memory=args.fisher_memory,
        progress=not args.no_progress,
    )
    total = sum(math.prod(shape) for shape in written.shapes.values())
    print(
        f"{'layers':<12}{len(written.shapes)}\n{'parameters':<12}{total}\n"
        f"{'examples':<12}{written.num_examples}\n{'tokens':<12}{written.num_tokens}\n"
        f"{'mode':<12}{args.mode}\nwrote {args.output}"
    )
    return 0
