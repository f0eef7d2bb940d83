"""The demo job: the cached models, :func:`fastunlearn.unlearn` on the forget set, a before/after table.

:func:`run_demo` prepares (or reuses) the demo's data and models (:mod:`fastunlearn.demo.models`),
computes the retain-only model's forget-set truth ratios once (the forget-quality reference), unlearns
the forget set with :func:`unlearn_options`, and prints the forget/retain metrics and TOFU's forget
quality and model utility before and after. ``DIR/metrics.json`` holds ``{"before": {"forget",
"retain", "tofu"}, "after": {...}, "train": {...}, "command": ...}`` (``tofu``:
:func:`fastunlearn.evaluation.summarize_tofu`). ``command`` (also in ``DIR/run_config.json``, and
printed) is the ``fastunlearn unlearn`` command line that trains the same model: the demo's settings
(template, length, learning rate, epochs, rank...) are not the command's defaults, which are the
paper's for a 7B model. The run is evaluated every epoch, so ``DIR/trajectory.csv`` and
``DIR/trajectory.png`` show forgetting and what the retain set keeps over the steps; it trains the
demo's fixed budget, or with ``stop`` until the ``tofu`` rule stops it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastunlearn._io import write_json
from fastunlearn.demo.models import (
    DEMO_MAX_LENGTH,
    DEMO_TEMPLATE,
    SIZES,
    DemoSize,
    default_cache_dir,
    prepare_models,
)

__all__ = ["STOP_PATIENCE", "run_demo", "unlearn_options"]

# Evaluations past the first crossing of a stopped demo (``run_demo(stop=True)``): IHL + FILA's retain
# numbers dip at the crossing and recover after it (README, "Does IHL + FILA beat the baselines?").
STOP_PATIENCE = 3

# ---------------------------------------------------------------------------------------------------
# The job


def unlearn_options(spec: DemoSize, *, seed: int) -> dict[str, Any]:
    """The :func:`fastunlearn.unlearn` options of the demo for a model of size ``spec``."""
    return dict(
        template=DEMO_TEMPLATE,
        max_length=DEMO_MAX_LENGTH,
        seed=seed,
        lora_r=spec.lora_r,
        lora_alpha=2 * spec.lora_r,
        learning_rate=spec.unlearn_lr,
        num_epochs=spec.unlearn_epochs,
        batch_size=spec.unlearn_batch,
        gradient_accumulation_steps=1,
        fisher_batch_size=8,
        eval_batch_size=128,
        logging_steps=10,
        # Forgetting over the run (trajectory.csv / .png), teacher-forced on 32 items per set: it does
        # not change the training (tests/test_stop_callback.py) and adds about a fifth to its loop.
        eval_every="epoch",
    )


def run_demo(
    output_dir: str,
    *,
    method: str = "ihl",
    init: str = "fila",
    seed: int = 0,
    size: str = "small",
    cache_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = 1,
    stop: bool = False,
    log=print,
):
    """Run the demo end to end and return the :class:`fastunlearn.UnlearnResult`.

    ``stop``: instead of the fixed budget, stop by the ``tofu`` rule measured on the demo's retain-only
    model, going on for :data:`STOP_PATIENCE` evaluations past the first crossing and keeping the best
    state (``--stop-when tofu --reference-model ... --patience 3 --restore best``).

    ``threads`` caps PyTorch's intra-op threads for the run (restored afterwards; ``None``: unchanged).
    The demo's matrices are a few hundred wide, too small for intra-op parallelism to pay, and on a busy
    machine OpenMP threads spin-waiting for a core multiply the run time (measured: 265 s with 2 threads
    against 60 s with 1 on a 2-core CPU shared with other jobs).
    """
    from fastunlearn.models.devices import num_threads

    with num_threads(threads):
        return _run_demo(
            output_dir, method, init, seed, size, cache_dir, overwrite, progress, threads, stop, log
        )


def _run_demo(
    output_dir: str,
    method: str,
    init: str,
    seed: int,
    size: str,
    cache_dir: str | None,
    overwrite: bool,
    progress: bool,
    threads: int | None,
    stop: bool,
    log,
):
    from fastunlearn.evaluation import cached_reference_truth_ratios
    from fastunlearn.evaluation.report import stopping_line, summary_table
    from fastunlearn.models.loading import load_model_and_tokenizer
    from fastunlearn.options.commandline import command_line
    from fastunlearn.options.schema import with_absolute_paths
    from fastunlearn.options.unlearn import UnlearnConfig
    from fastunlearn.training.outputs import plan_run
    from fastunlearn.training.pipeline import run_unlearning

    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {list(SIZES)}")
    spec = SIZES[size]
    # unlearn() checks too, but only after the models are built and evaluated: refuse before any work.
    plan_run(output_dir, overwrite=overwrite, resume=False, resume_offered=False)
    start = time.perf_counter()
    paths = prepare_models(cache_dir or default_cache_dir(), spec, seed=seed, progress=progress, log=log)
    reference = cached_reference_truth_ratios(
        paths["retain_model"],
        {"forget": paths["forget_perturbed"]},
        os.path.join(paths["dir"], "reference_truth_ratios.json"),
        **_tofu_options(),
    )
    full_model, tokenizer = load_model_and_tokenizer(paths["full_model"])
    before = _tofu_metrics(full_model, tokenizer, paths, reference)
    del full_model
    options = unlearn_options(spec, seed=seed)
    if stop:  # the retain-only model gives the rule's reference values
        options.update(
            stop="tofu", reference_model=paths["retain_model"], patience=STOP_PATIENCE, restore="best"
        )
    cfg = UnlearnConfig(
        model=paths["full_model"],
        forget=paths["forget"],
        retain=paths["retain"],
        method=method,
        init=init,
        output_dir=output_dir,
        overwrite=overwrite,
        progress=progress,
        threads=threads,
        **options,
    )
    command = command_line(with_absolute_paths(cfg), "unlearn", skip=("overwrite", "resume", "progress"))
    name = os.path.basename(paths["forget"])
    log(f"Unlearning {name} with method={method}, init={init}; the same run as the command\n  {command}")
    result = run_unlearning(cfg)
    result.metrics["before"]["tofu"] = before
    result.metrics["after"]["tofu"] = _tofu_metrics(result.model, result.tokenizer, paths, reference)
    result.metrics["command"] = command
    write_json(result.metrics_path, result.metrics)
    log("")
    log(summary_table(_without_tofu(result.metrics)))
    log(stopping_line(result.metrics["stopping"]))
    log(_tofu_table(result.metrics["before"]["tofu"], result.metrics["after"]["tofu"]))
    trajectory = result.metrics["stopping"]["trajectory_png"] or result.metrics["stopping"]["trajectory_csv"]
    log(
        f"\nDone in {time.perf_counter() - start:.1f} s. Outputs in {result.output_dir} (forgetting over "
        f"the steps: {trajectory}); retain-only reference model in {paths['retain_model']}"
    )
    return result


def _tofu_options() -> dict:
    # Greedy answers of up to 32 tokens: "Answer: " (the tofu-phi prompt stops before it) and every demo
    # answer fit, so ROUGE-L sees the answer whole.
    return dict(template=DEMO_TEMPLATE, max_length=DEMO_MAX_LENGTH, max_new_tokens=32, batch_size=64)


def _tofu_metrics(model, tokenizer, paths: dict[str, str], reference: list[float]) -> dict[str, float]:
    """TOFU's headline numbers (SPEC §4) on the demo's forget and retain sets.

    Forget quality is the KS-test p-value of the forget-set truth ratios against the retain-only
    model's (``reference``); model utility the harmonic mean of the retain set's probability, ROUGE-L
    recall and ``mean max(0, 1 − R)`` (3 of TOFU's 9 numbers: the demo has no real-authors or
    world-facts sets).
    """
    from fastunlearn.evaluation import evaluate_tofu, summarize_tofu

    sets = {"forget": paths["forget_perturbed"], "retain": paths["retain_perturbed"]}
    return summarize_tofu(
        evaluate_tofu(model, tokenizer, sets, reference_truth_ratios=reference, **_tofu_options())
    )


def _without_tofu(metrics: dict) -> dict:
    """``metrics`` with the per-split forget/retain numbers only (what ``summary_table`` renders)."""
    return {
        key: {k: v for k, v in value.items() if k != "tofu"} if key in ("before", "after") else value
        for key, value in metrics.items()
    }


_TOFU_ROWS = (
    ("forget_quality", "forget quality (KS p)"),
    ("model_utility_partial", "retain utility (3 of 9)"),
    ("forget_truth_ratio_mean", "forget truth ratio"),
    ("forget_rougeL_recall", "forget ROUGE-L"),
    ("retain_rougeL_recall", "retain ROUGE-L"),
    ("retain_truth_ratio", "retain max(0, 1-R)"),
)


def _tofu_table(before: dict, after: dict) -> str:
    """Before/after rows of the TOFU numbers (3 significant digits: forget quality spans decades)."""
    lines = [f"\n{'TOFU':<24}{'before':>12}{'after':>12}"]
    for key, label in _TOFU_ROWS:
        lines.append(f"{label:<24}{before[key]:>12.3g}{after[key]:>12.3g}")
    return "\n".join(lines)
