"""Unlearning quality: does IHL + FILA beat the baselines? Our own measurements, every epoch.

Methods {ga, gd, ihl} × initialisations {lora, fila}, plus ihl with full fine-tuning, each for several
seeds with the same step budget (same epochs, batch size and data). After FILA/LoRA set-up and after
every epoch the TOFU protocol (SPEC §4) is run on the forget and retain sets:

- forget: length-normalised answer probability, teacher-forced accuracy, ROUGE-L recall of the greedy
  answer, truth ratio;
- forget quality: KS-test p-value of the forget-set truth ratios against the retain-only model's;
- model utility: harmonic mean of the retain set's probability, ROUGE-L recall and truth-ratio score
  (3 of TOFU's 9 numbers: the synthetic data has no real-authors / world-facts sets).

``utility_prob_rouge`` (the harmonic mean of retain probability and ROUGE-L only) is reported next to
model utility: it separates a change in the model's answers from a change in its truth ratios.

"Forgetting threshold": the TOFU analogue of the extraction stopping rule (MA and EL_10 below their
values on unseen text, SPEC §4): the forget set's teacher-forced accuracy (≈ MA) **and** ROUGE-L recall
of the greedy answer (≈ EL) both at or below the retain-only model's values on the forget set (the
model that never saw those authors). The step at which each run first reaches it is recorded
(per-epoch resolution).

Data: the demo's synthetic TOFU-format set, memorised model and retain-only model (built and cached
by :mod:`fastunlearn.demo`), or a local model + TOFU files given by path. Writes under
``benchmarks/results/``: ``quality_epochs.csv`` (every run, every epoch), ``quality_summary.csv``,
``quality.json`` (with the environment), ``quality.png`` (forget quality against model utility over
training) and ``quality.md`` (the README table).

    python benchmarks/bench_quality.py                       # demo data, 3 seeds, ~4 min on 2 cores
    python benchmarks/bench_quality.py --model M --retain-model R --forget F --retain S --template tofu-phi

The demo's data are trained and evaluated with TOFU's own tokenisation (``tofu-phi``, SPEC §4.1); with
``--model``, ``--template`` names the convention the model was fine-tuned with (``tofu-llama2``,
``tofu-phi``, ... for TOFU's models).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, environment, write_results

from fastunlearn import evaluation as ev
from fastunlearn import metrics as M
from fastunlearn._io import write_json, write_text
from fastunlearn.modeling import load_model_and_tokenizer

CONFIGS = [
    ("ga", "lora"),
    ("ga", "fila"),
    ("gd", "lora"),
    ("gd", "fila"),
    ("ihl", "lora"),
    ("ihl", "fila"),
    ("ihl", "full"),
]


def demo_inputs(size: str, cache_dir: str | None, seed: int) -> dict[str, Any]:
    """Paths and training options of the demo: its data, models and unlearning hyper-parameters."""
    from fastunlearn import demo

    spec = demo.SIZES[size]
    paths = demo.prepare_models(cache_dir or demo.default_cache_dir(), spec, seed=seed, progress=False)
    return {
        "model": paths["full_model"],
        "retain_model": paths["retain_model"],
        "train_forget": paths["forget"],
        "train_retain": paths["retain"],
        "forget": paths["forget_perturbed"],
        "retain": paths["retain_perturbed"],
        "template": demo.DEMO_TEMPLATE,
        "max_length": demo.DEMO_MAX_LENGTH,
        "epochs": spec.unlearn_epochs,
        "lr": spec.unlearn_lr,
        "lora_r": spec.lora_r,
        "batch_size": getattr(spec, "unlearn_batch", 8),
    }


class TofuProbe:
    """The per-epoch evaluation: TOFU numbers on forget and (a fixed subset of) retain."""

    def __init__(
        self, tokenizer, forget, retain, *, template, max_length, reference, retain_items, max_new_tokens
    ):
        self.tok, self.template, self.max_length = tokenizer, template, max_length
        self.sets = {"forget": ev.read_tofu_file(forget), "retain": ev.read_tofu_file(retain)[:retain_items]}
        self.reference, self.max_new_tokens = reference, max_new_tokens

    def __call__(self, model) -> dict[str, float]:
        res = ev.evaluate_tofu(
            model,
            self.tok,
            self.sets,
            template=self.template,
            max_length=self.max_length,
            reference_truth_ratios=self.reference,
            max_new_tokens=self.max_new_tokens,
            batch_size=64,
        )
        f, r = res["sets"]["forget"], res["sets"]["retain"]
        out = {
            "forget_prob": f["prob"],
            "forget_accuracy": f["accuracy"],
            "forget_rougeL": f["rougeL_recall"],
            "forget_truth_ratio": f["truth_ratio_mean"],
            "retain_prob": r["prob"],
            "retain_rougeL": r["rougeL_recall"],
            "retain_truth_ratio_score": r["truth_ratio"],
            "forget_quality": res["forget_quality"],
            "model_utility": res["model_utility_partial"],  # retain set only: 3 of TOFU's 9 numbers
            # Without the truth-ratio component (see the module docstring).
            "utility_prob_rouge": M.model_utility([r["prob"], r["rougeL_recall"]]),
        }
        return out, res["forget_truth_ratios"]


def run_one(inputs, tokenizer, probe, method, init, seed, epochs, out_root) -> list[dict[str, Any]]:
    """One unlearning run with the probe after set-up and after every epoch."""
    from fastunlearn.training.run import unlearn

    history = []

    def evaluate_fn(model):
        metrics, _ = probe(model)
        return metrics

    callback = ev.EpochEvaluationCallback(evaluate_fn, restore_best=False, evaluate_at_start=True)
    options = dict(
        template=inputs["template"],
        max_length=inputs["max_length"],
        seed=seed,
        num_epochs=epochs,
        learning_rate=inputs["lr"] if init != "full" else inputs["lr"] / 10,
        lora_r=inputs["lora_r"],
        lora_alpha=2 * inputs["lora_r"],
        batch_size=inputs["batch_size"],
        gradient_accumulation_steps=1,
        fisher_batch_size=8,
        eval_batch_size=128,
        logging_steps=1000,
        progress=False,
        evaluate=False,
        overwrite=True,
    )
    start = time.perf_counter()
    unlearn(
        inputs["model"],
        tokenizer,
        inputs.get("train_forget", inputs["forget"]),
        inputs.get("train_retain", inputs["retain"]),
        method=method,
        init=init,
        output_dir=os.path.join(out_root, f"{method}-{init}-{seed}"),
        callbacks=[callback],
        **options,
    )
    seconds = time.perf_counter() - start
    for rec in callback.history:
        history.append({"method": method, "init": init, "seed": seed, **rec, "run_s": round(seconds, 1)})
    return history


def forgotten(rec: dict[str, Any], threshold: dict[str, float]) -> bool:
    return all(rec[key] <= value for key, value in threshold.items())


def summarise(rows, threshold: dict[str, float]) -> list[dict[str, Any]]:
    summary = []
    for method, init in CONFIGS:
        runs = {}
        for r in rows:
            if r["method"] == method and r["init"] == init:
                runs.setdefault(r["seed"], []).append(r)
        if not runs:
            continue
        finals = [max(h, key=lambda x: x["step"]) for h in runs.values()]
        reach = []
        for h in runs.values():
            hit = [x["step"] for x in sorted(h, key=lambda x: x["step"]) if forgotten(x, threshold)]
            reach.append(hit[0] if hit else None)
        reached = [s for s in reach if s is not None]

        def ms(key, finals=finals):
            vals = [f[key] for f in finals]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        row = {"method": method, "init": init, "seeds": len(finals), "steps": finals[0]["step"]}
        for key in (
            "forget_prob",
            "forget_accuracy",
            "forget_rougeL",
            "forget_quality",
            "retain_prob",
            "retain_rougeL",
            "model_utility",
            "utility_prob_rouge",
        ):
            row[f"{key}_mean"], row[f"{key}_std"] = ms(key)
        row["log10_fq_mean"] = statistics.mean(math.log10(max(f["forget_quality"], 1e-300)) for f in finals)
        row["reached_threshold"] = f"{len(reached)}/{len(reach)}"
        row["steps_to_threshold_median"] = statistics.median(reached) if reached else None
        # Best epoch by forget quality (earliest on ties): what per-epoch selection would keep.
        peaks = [
            max(sorted(h, key=lambda x: x["step"]), key=lambda x: x["forget_quality"]) for h in runs.values()
        ]
        row["best_epoch_fq_mean"] = statistics.mean(x["forget_quality"] for x in peaks)
        row["best_epoch_utility_mean"] = statistics.mean(x["model_utility"] for x in peaks)
        row["best_epoch_step_median"] = statistics.median(x["step"] for x in peaks)
        row["run_s_mean"] = statistics.mean(f["run_s"] for f in finals)
        summary.append(row)
    return summary


def plot(rows, before, reference, path: Path) -> None:
    """Forget quality against utility over training (mean over seeds per epoch), like the paper's
    figures: left with TOFU's model utility, right with its probability and ROUGE-L components only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ga": "tab:red", "gd": "tab:orange", "ihl": "tab:blue"}
    styles = {"lora": "--", "fila": "-", "full": ":"}
    log_fq = lambda v: math.log10(max(v, 1e-300))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, label in (
        (axes[0], "model_utility", "retain utility (3 of TOFU's 9: retain prob, ROUGE-L, truth-ratio score)"),
        (axes[1], "utility_prob_rouge", "utility without truth ratio (retain prob, ROUGE-L)"),
    ):
        for method, init in CONFIGS:
            steps = sorted({r["step"] for r in rows if r["method"] == method and r["init"] == init})
            if not steps:
                continue
            xs, ys = [], []
            for s in steps:
                sel = [r for r in rows if r["method"] == method and r["init"] == init and r["step"] == s]
                xs.append(statistics.mean(r[key] for r in sel))
                ys.append(statistics.mean(log_fq(r["forget_quality"]) for r in sel))
            ax.plot(xs, ys, styles[init], marker="o", ms=3, color=colors[method], label=f"{method} + {init}")
            ax.plot(xs[-1], ys[-1], marker="*", ms=11, color=colors[method])
        ax.plot(before[key], log_fq(before["forget_quality"]), "ks", ms=7, label="before unlearning")
        ax.plot(reference[key], log_fq(reference["forget_quality"]), "k^", ms=8, label="retain-only model")
        ax.set_xlabel(label)
        ax.set_ylabel("forget quality: log10 KS p-value (higher is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Unlearning the synthetic TOFU forget set: one point per epoch (mean over seeds), ★ = end")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(summary, meta) -> str:
    lines = [
        "| method | init | forget quality (KS p) | retain utility | utility w/o truth ratio | forget prob "
        "| forget ROUGE-L | retain prob | retain ROUGE-L | reached threshold | steps to threshold "
        "| best-epoch FQ (utility, step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        steps = "—" if r["steps_to_threshold_median"] is None else f"{r['steps_to_threshold_median']:.0f}"
        lines.append(
            f"| {r['method']} | {r['init']} | {r['forget_quality_mean']:.3g} ± {r['forget_quality_std']:.2g} "
            f"| {r['model_utility_mean']:.3f} ± {r['model_utility_std']:.3f} "
            f"| {r['utility_prob_rouge_mean']:.3f} ± {r['utility_prob_rouge_std']:.3f} "
            f"| {r['forget_prob_mean']:.3f} | {r['forget_rougeL_mean']:.3f} | {r['retain_prob_mean']:.3f} "
            f"| {r['retain_rougeL_mean']:.3f} | {r['reached_threshold']} | {steps} "
            f"| {r['best_epoch_fq_mean']:.3g} ({r['best_epoch_utility_mean']:.3f}, "
            f"{r['best_epoch_step_median']:.0f}) |"
        )
    b, ref = meta["before"], meta["retain_only"]
    notes = [
        f"Before unlearning: forget quality {b['forget_quality']:.3g},",
        f"retain utility {b['model_utility']:.3f}, forget prob {b['forget_prob']:.3f},",
        f"retain prob {b['retain_prob']:.3f}. Retain-only model (the target):",
        f"forget prob {ref['forget_prob']:.3f}, retain utility {ref['model_utility']:.3f}.",
        "Retain utility: the harmonic mean of the retain set's three TOFU numbers (probability, ROUGE-L,",
        "truth-ratio score); TOFU's model utility also needs real-author and world-fact sets, which the",
        "synthetic data does not have.",
        f"Mean ± std over {meta['seeds']} seeds after {meta['steps']} optimiser steps",
        f"({meta['epochs']} epochs, batch {meta['batch_size']}), {meta['items']}.",
        "Threshold (TOFU analogue of the extraction stopping rule): forget accuracy ≤ "
        f"{meta['threshold']['forget_accuracy']:.3f} and forget ROUGE-L ≤ "
        f"{meta['threshold']['forget_rougeL']:.3f}, the retain-only model's values on the forget set.",
        f"Learning rate {meta['lr']:g} for LoRA/FILA, {meta['lr'] / 10:g} for full fine-tuning.",
        "Final numbers are after the last epoch; the last column is the epoch of highest forget quality",
        "(mean over seeds of its FQ and utility, median step).",
        f"{meta['device']}; {meta['date']}.",
    ]
    if b["retain_truth_ratio_score"] == 0.0:
        notes.append(
            "The retain truth-ratio score of the model before unlearning is 0 (perturbed answers likelier "
            "than the paraphrased one), which zeroes the retain utility; the column without the truth "
            "ratio (harmonic mean of retain prob and ROUGE-L) carries the comparison."
        )
    lines += ["", " ".join(notes)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="demo size (default: small)")
    p.add_argument("--cache-dir", default=None, help="demo cache directory")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the demo data and models")
    p.add_argument("--seeds", type=int, default=3, help="unlearning seeds per configuration")
    p.add_argument("--epochs", type=float, default=None, help="epochs (default: the demo's)")
    p.add_argument("--configs", default=None, help="comma list like ihl-fila,ga-lora (default: all 7)")
    p.add_argument("--retain-items", type=int, default=42, help="retain items evaluated per epoch")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    for name in ("model", "retain-model", "forget", "retain", "template"):
        p.add_argument(f"--{name}", default=None, help="instead of the demo: local path / template name")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", category=FutureWarning)

    if args.model:
        inputs = {
            "model": args.model,
            "retain_model": args.retain_model,
            "forget": args.forget,
            "retain": args.retain,
            "template": args.template,
            "max_length": args.max_length or 512,
            "epochs": 5,
            "lr": 1e-4,
            "lora_r": 32,
            "batch_size": 8,
        }
        missing = [k for k in ("retain_model", "forget", "retain", "template") if not inputs[k]]
        if missing:
            raise SystemExit(
                f"with --model, also give {', '.join('--' + m.replace('_', '-') for m in missing)}"
            )
    else:
        inputs = demo_inputs(args.size, args.cache_dir, args.data_seed)
    for key, value in (
        ("lr", args.lr),
        ("lora_r", args.lora_r),
        ("max_length", args.max_length),
        ("epochs", args.epochs),
    ):
        if value is not None:
            inputs[key] = value
    configs = CONFIGS if not args.configs else [tuple(c.split("-")) for c in args.configs.split(",")]

    # The retain-only model gives the forget-quality reference and the forgetting threshold.
    ref_model, tokenizer = load_model_and_tokenizer(inputs["retain_model"])
    probe = TofuProbe(
        tokenizer,
        inputs["forget"],
        inputs["retain"],
        template=inputs["template"],
        max_length=inputs["max_length"],
        reference=None,
        retain_items=args.retain_items,
        max_new_tokens=args.max_new_tokens,
    )
    ref_metrics, ref_ratios = probe(ref_model)
    # Against itself the retain-only model's forget quality is the KS p-value of identical samples.
    ref_metrics["forget_quality"] = M.forget_quality(ref_ratios, ref_ratios)
    probe.reference = ref_ratios
    full_model, _ = load_model_and_tokenizer(inputs["model"])
    before, _ = probe(full_model)
    del ref_model, full_model
    threshold = {key: ref_metrics[key] for key in ("forget_accuracy", "forget_rougeL")}
    print(f"retain-only model: {ref_metrics}\nbefore unlearning: {before}", flush=True)

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastunlearn-bench-quality-") as out_root:
        for method, init in configs:
            for seed in range(args.seeds):
                hist = run_one(inputs, tokenizer, probe, method, init, seed, inputs["epochs"], out_root)
                rows.extend(hist)
                last = hist[-1]
                print(
                    f"{method:>3}+{init:<4} seed {seed}: step {last['step']:>3}  "
                    f"FQ {last['forget_quality']:.3g}  "
                    f"MU {last['model_utility']:.3f}  forget prob {last['forget_prob']:.3f}  "
                    f"retain prob {last['retain_prob']:.3f}  ({last['run_s']:.0f} s)",
                    flush=True,
                )
    total = time.perf_counter() - start
    summary = summarise(rows, threshold)
    env = environment(torch.device("cpu"))
    env.update(total_s=round(total, 1), note="shared 2-core CPU; timings include other processes' load")
    write_results("quality_epochs", rows, env)
    write_results("quality_summary", summary, env)
    meta = {
        "before": before,
        "retain_only": ref_metrics,
        "seeds": args.seeds,
        "steps": summary[0]["steps"],
        "epochs": inputs["epochs"],
        "batch_size": inputs["batch_size"],
        "threshold": threshold,
        "lr": inputs["lr"],
        "device": env["device"],
        "date": env["date"],
        "items": f"{len(probe.sets['forget'])} forget and {len(probe.sets['retain'])} retain items evaluated",
    }
    write_json(RESULTS_DIR / "quality.json", {"environment": env, "meta": meta, "summary": summary})
    plot(rows, before, ref_metrics, RESULTS_DIR / "quality.png")
    table = markdown(summary, meta)
    write_text(RESULTS_DIR / "quality.md", table)
    print("\n" + table + f"\ntotal {total:.0f} s")


if __name__ == "__main__":
    main()
