"""The demo: the whole unlearning job, offline, on a laptop CPU in a few minutes (``fastunlearn demo``):
synthetic TOFU-format data, a tokenizer and small models that memorise it, cached (:mod:`.models`),
then :func:`fastunlearn.unlearn` and a before/after table.

``DIR/metrics.json`` adds TOFU's forget quality and model utility before and after (``tofu``) and the
``fastunlearn unlearn`` command line that trains the same model (``command``: the demo's settings are
not the command's 7B defaults); evaluated every epoch, ``DIR/trajectory.csv`` / ``.png`` show the run.
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
    build_model,
    default_cache_dir,
    generate_dataset,
    prepare_models,
    train_tokenizer,
    write_jsonl,
)

__all__ = [
    "DEMO_TEMPLATE",
    "SIZES",
    "build_model",
    "default_cache_dir",
    "generate_dataset",
    "prepare_models",
    "run_demo",
    "train_tokenizer",
    "write_jsonl",
]

# Evaluations past the first crossing of a stopped demo: IHL + FILA's retain numbers dip at the
# crossing and recover after it.
STOP_PATIENCE = 3
# Greedy answers of up to 32 tokens: "Answer: " (the tofu-phi prompt stops before it) and every demo
# answer fit, so ROUGE-L sees the answer whole.
_TOFU_OPTIONS = dict(template=DEMO_TEMPLATE, max_length=DEMO_MAX_LENGTH, max_new_tokens=32, batch_size=64)


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
        eval_every="epoch",  # teacher-forced on 32 items per set; it does not change the training
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

    ``stop``: instead of the fixed budget, stop by the ``tofu`` rule measured on the retain-only model,
    :data:`STOP_PATIENCE` evaluations past the first crossing, keeping the best state. ``threads`` caps
    PyTorch's intra-op threads (``None``: unchanged): the demo's matrices are too small for intra-op
    parallelism to pay, and on a busy machine spin-waiting OpenMP threads multiply the run time.
    """
    from fastunlearn.evaluation import cached_reference_truth_ratios
    from fastunlearn.models.devices import num_threads
    from fastunlearn.models.loading import load_model_and_tokenizer
    from fastunlearn.options.schema import command_line, with_absolute_paths
    from fastunlearn.options.unlearn import UnlearnConfig
    from fastunlearn.training.outputs import plan_run
    from fastunlearn.training.pipeline import run_unlearning

    with num_threads(threads):
        if size not in SIZES:
            raise ValueError(f"unknown demo size {size!r}; expected one of {list(SIZES)}")
        # unlearn() checks too, but only after the models are built and evaluated: refuse before any work.
        plan_run(output_dir, overwrite=overwrite, resume=False, resume_offered=False)
        start = time.perf_counter()
        paths = prepare_models(
            cache_dir or default_cache_dir(), SIZES[size], seed=seed, progress=progress, log=log
        )
        reference = cached_reference_truth_ratios(
            paths["retain_model"],
            {"forget": paths["forget_perturbed"]},
            os.path.join(paths["dir"], "reference_truth_ratios.json"),
            **_TOFU_OPTIONS,
        )
        full_model, tokenizer = load_model_and_tokenizer(paths["full_model"])
        before = _tofu_metrics(full_model, tokenizer, paths, reference)
        del full_model
        options = unlearn_options(SIZES[size], seed=seed)
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
        command = command_line(with_absolute_paths(cfg), "unlearn")
        name = os.path.basename(paths["forget"])
        log(f"Unlearning {name} with method={method}, init={init}; the same run as the command\n  {command}")
        result = run_unlearning(cfg)
        metrics = result.metrics
        metrics["before"]["tofu"] = before
        metrics["after"]["tofu"] = _tofu_metrics(result.model, result.tokenizer, paths, reference)
        metrics["command"] = command
        write_json(result.metrics_path, metrics)
    _report(result, paths["retain_model"], time.perf_counter() - start, log)
    return result


def _tofu_metrics(model, tokenizer, paths: dict[str, str], reference: list[float]) -> dict[str, float]:
    """TOFU's forget quality (the KS-test p-value of the forget-set truth ratios against the retain-only
    model's ``reference``) and 3 of model utility's 9 numbers (the demo has no real-authors or
    world-facts sets)."""
    from fastunlearn.evaluation import evaluate_tofu, summarize_tofu

    sets = {"forget": paths["forget_perturbed"], "retain": paths["retain_perturbed"]}
    return summarize_tofu(
        evaluate_tofu(model, tokenizer, sets, reference_truth_ratios=reference, **_TOFU_OPTIONS)
    )


_TOFU_ROWS = (
    ("forget_quality", "forget quality (KS p)"),
    ("model_utility_partial", "retain utility (3 of 9)"),
    ("forget_truth_ratio_mean", "forget truth ratio"),
    ("forget_rougeL_recall", "forget ROUGE-L"),
    ("retain_rougeL_recall", "retain ROUGE-L"),
    ("retain_truth_ratio", "retain max(0, 1-R)"),
)


def _report(result: Any, retain_model: str, seconds: float, log) -> None:
    """The run's before/after table, its stopping line, the TOFU numbers (3 significant digits: forget
    quality spans decades) and where the outputs are."""
    from fastunlearn.evaluation.report import stopping_line, summary_table

    metrics = result.metrics
    splits = {key: {k: v for k, v in metrics[key].items() if k != "tofu"} for key in ("before", "after")}
    log("")
    log(summary_table({**metrics, **splits}))
    log(stopping_line(metrics["stopping"]))
    before, after = metrics["before"]["tofu"], metrics["after"]["tofu"]
    rows = [f"{label:<24}{before[key]:>12.3g}{after[key]:>12.3g}" for key, label in _TOFU_ROWS]
    log("\n".join([f"\n{'TOFU':<24}{'before':>12}{'after':>12}", *rows]))
    trajectory = metrics["stopping"]["trajectory_png"] or metrics["stopping"]["trajectory_csv"]
    log(
        f"\nDone in {seconds:.1f} s. Outputs in {result.output_dir} (forgetting over the steps: "
        f"{trajectory}); retain-only reference model in {retain_model}"
    )
