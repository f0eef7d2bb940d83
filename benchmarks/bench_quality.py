"""Unlearning quality with a stopping rule: how fast does each method forget, and what does it keep?

Every method of :mod:`fastunlearn.methods` (ga, gd, kl, ihl, npo, npo+gd, npo+kl, simnpo, idk, dpo,
rmu) × initialisations {lora, fila} (RMU with LoRA only: it refuses FILA). Every run is stopped by the
``tofu`` rule (:mod:`fastunlearn.evaluation.stopping`): training stops at the first
evaluation (every epoch, ``unlearn``'s default, or every ``--eval-every`` optimiser steps) where the
forget set's teacher-forced accuracy **and** ROUGE-L recall of the greedy answer are at or below the
retain-only model's values on the same forget items — the model that never saw those authors. That
state (adapter / weights) is kept.

1. **Learning-rate sweep, equal budget per method**: each method × init is run once (sweep seed, not
   one of the reported seeds) at each of ``--lr-factors`` × its base learning rate (the demo's for
   LoRA / FILA, a tenth of it for full fine-tuning). The chosen rate is the one whose run reaches the
   rule with the highest retained teacher-forced performance at the stop (harmonic mean of retain
   probability and accuracy relative to the model before unlearning, measured by the run itself);
   ties (within 0.001) go to fewer steps; when no rate reaches the rule, the one with the lowest final
   forget accuracy.
2. **Reported runs**: ``--seeds`` seeds at the chosen rate; the kept model is scored with the TOFU
   protocol (Maini et al. 2024) on the forget set and a fixed subset of the retain set: forget quality
   (KS test of truth ratios against the retain-only model's), retain probability, ROUGE-L and
   truth-ratio score, and their harmonic mean (*retain utility*: 3 of TOFU's 9 numbers, the synthetic
   data has no real-authors / world-facts sets).

Reported per method × init, mean ± std over seeds: steps to the threshold, forget accuracy / ROUGE-L
at the stop, retain probability and utility relative to the model before unlearning, forget quality,
and the evaluation overhead (seconds spent evaluating during training / seconds training).

Data: the demo's synthetic TOFU-format set, memorised model and retain-only model (built and cached
by :mod:`fastunlearn.demo`), or a local model + data given by path. Writes under
``benchmarks/results/``: ``quality_runs.csv`` (every run, sweep included), ``quality_summary.csv``,
``quality_trajectories.csv`` (every evaluation of every run), ``quality.json`` (with the environment),
``quality.png`` (the forget-vs-retain trade-off: each method's path over the evaluations and its
stopping point) and ``quality.md`` (the table); ``quality_every{N}*`` with ``--eval-every N``,
``quality*_patience{K}_{restore}*`` with ``--patience K --restore POLICY`` (unlearn's options: go on K
evaluations past the first crossing and keep the first / best / last state that satisfies the rule).

    python benchmarks/bench_quality.py --seeds 3 --patience 3 --restore best --tag methods  # ~1 h
    python benchmarks/bench_quality.py --model M --retain-model R --forget F --retain S \\
        --eval-forget FP --eval-retain RP --template tofu-phi

The demo's data are trained and evaluated with TOFU's own tokenisation (``tofu-phi``); with
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

from fastunlearn import data as fdata
from fastunlearn import evaluation as ev
from fastunlearn import metrics as M
from fastunlearn._io import write_json, write_text
from fastunlearn.evaluation.sets import SetEvaluator
from fastunlearn.evaluation.stop_callback import measure_reference, read_trajectory
from fastunlearn.evaluation.stopping import parse_stop_rule
from fastunlearn.methods import METHODS
from fastunlearn.models.loading import load_model_and_tokenizer

# Every method of fastunlearn.methods with LoRA and FILA (RMU refuses FILA).
CONFIGS = [(m, i) for m in METHODS for i in ("lora", "fila") if (m, i) != ("rmu", "fila")]
# RMU's published α = 1200 and c = 6.5 are for a 7B model's activations (WMDP); on the demo's 128-wide
# model α = 1200 (or 1) holds every activation in place and c = 6.5 is small beside them: α = 0.3 and
# c = 20 were the first values a short probe found to reach the rule (hand-tuned, unlike the others).
METHOD_OPTIONS = {"rmu": {"retain_weight": 0.3, "rmu_steering": 20.0}}
EVAL_ITEMS = 32  # unlearn's default: the whole 21-item forget set, 32 of the 189 retain items
EVAL_BATCH = 64


def demo_inputs(size: str, cache_dir: str | None, seed: int) -> dict[str, Any]:
    """Paths of the demo's data and models, and its unlearning options
    (:func:`fastunlearn.demo.unlearn_options`: what ``fastunlearn demo`` trains with)."""
    from fastunlearn import demo
    from fastunlearn.demo import unlearn_options

    spec = demo.SIZES[size]
    paths = demo.prepare_models(cache_dir or demo.default_cache_dir(), spec, seed=seed, progress=False)
    return {
        "model": paths["full_model"],
        "retain_model": paths["retain_model"],
        "train_forget": paths["forget"],
        "train_retain": paths["retain"],
        "forget": paths["forget_perturbed"],
        "retain": paths["retain_perturbed"],
        "options": unlearn_options(spec, seed=0),
    }


def local_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Paths of a local model and data, with the paper's TOFU options for a small model (Cha et al. 2025)."""
    inputs = {
        "model": args.model,
        "retain_model": args.retain_model,
        "train_forget": args.forget,
        "train_retain": args.retain,
        "forget": args.eval_forget,
        "retain": args.eval_retain,
        "options": dict(
            template=args.template,
            max_length=512,
            lora_r=32,
            lora_alpha=64,
            learning_rate=1e-4,
            num_epochs=5,
            batch_size=8,
            gradient_accumulation_steps=1,
            fisher_batch_size=8,
            eval_batch_size=EVAL_BATCH,
        ),
    }
    names = ("retain_model", "train_forget", "train_retain", "forget", "retain")
    missing = [k for k in names if not inputs[k]] + ([] if args.template else ["template"])
    if missing:
        raise SystemExit(f"with --model, also give {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return inputs


class TofuProbe:
    """The TOFU numbers of a model on the forget set and a fixed subset of the retain set."""

    def __init__(
        self, tokenizer, forget, retain, *, template, max_length, reference, retain_items, max_new_tokens
    ):
        self.tok, self.template, self.max_length = tokenizer, template, max_length
        self.sets = {"forget": ev.read_tofu_file(forget), "retain": ev.read_tofu_file(retain)[:retain_items]}
        self.reference, self.max_new_tokens = reference, max_new_tokens

    def __call__(self, model) -> tuple[dict[str, float], Any]:
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
            "forget_quality": res["forget_quality"],
            "retain_prob": r["prob"],
            "retain_rougeL": r["rougeL_recall"],
            "retain_truth_ratio_score": r["truth_ratio"],
            "model_utility": res["model_utility_partial"],  # retain set only: 3 of TOFU's 9 numbers
            "utility_prob_rouge": M.model_utility([r["prob"], r["rougeL_recall"]]),
        }
        return out, res["forget_truth_ratios"]


def rule_evaluator(inputs, tokenizer) -> SetEvaluator:
    """The forget-set evaluator of ``unlearn(stop="tofu")``: the same subset and generation budget."""
    forget = fdata.prepare(
        inputs["train_forget"],
        tokenizer,
        name="forget",
        template=inputs["options"]["template"],
        max_length=inputs["options"]["max_length"],
    )
    batch = inputs["options"]["eval_batch_size"]
    return SetEvaluator(tokenizer, forget, eval_items=EVAL_ITEMS, batch_size=batch)


def tofu_rule(inputs, tokenizer, evaluator: SetEvaluator) -> tuple[str, dict[str, float]]:
    """The tofu rule with its reference values measured once on the retain-only model, as
    ``unlearn(stop="tofu", reference_model=...)`` measures them at the start of every run."""
    reference, _ = load_model_and_tokenizer(inputs["retain_model"], tokenizer)
    rule = measure_reference(parse_stop_rule("tofu", reference_model=reference), evaluator, reference)
    acc, rouge = rule.reference["acc"], rule.reference["rougeL"]
    return f"tofu:acc={acc!r},rougeL={rouge!r}", {"acc": acc, "rougeL": rouge}


def run_one(
    inputs, tokenizer, rule, method, init, lr, seed, out_root, every, patience=0, restore="first"
) -> tuple[dict[str, Any], Any, list]:
    """One unlearning run stopped by ``rule`` (with ``patience`` / ``restore``): its outcome, the kept
    model and its trajectory."""
    from fastunlearn.training.pipeline import unlearn

    out_dir = os.path.join(out_root, f"{method}-{init}-{lr:g}-{seed}")
    start = time.perf_counter()
    result = unlearn(
        inputs["model"],
        tokenizer,
        inputs["train_forget"],
        inputs["train_retain"],
        method=method,
        init=init,
        output_dir=out_dir,
        stop=rule,
        eval_items=EVAL_ITEMS,
        patience=patience,
        restore=restore,
        **{
            **inputs["options"],
            "eval_every": every,
            "learning_rate": lr,
            "seed": seed,
            "logging_steps": 1000,
            **METHOD_OPTIONS.get(method, {}),
        },
        progress=False,
        evaluate=False,
        overwrite=True,
    )
    seconds = time.perf_counter() - start
    s = result.metrics["stopping"]
    trajectory = read_trajectory(os.path.join(out_dir, "trajectory.csv"))
    base, kept = trajectory[0], s["kept_metrics"]
    ratios = [kept[m] / base[m] for m in ("retain.prob", "retain.acc")]
    row = {
        "method": method,
        "init": init,
        "lr": lr,
        "seed": seed,
        "reached": s["satisfied"],
        "steps_to_threshold": s["first_satisfied_step"],
        "final_step": result.metrics["train"]["global_step"],
        "kept_step": s["kept_step"],
        "forget_acc": kept["forget.acc"],
        "retain_prob_tf": kept["retain.prob"],
        "retain_acc_tf": kept["retain.acc"],
        "retain_score_tf": 0.0 if min(ratios) <= 0 else len(ratios) / sum(1 / x for x in ratios),
        "eval_s": s["eval_s"],
        "train_s": s["train_s"],
        "eval_fraction": s["eval_fraction"],
        "run_s": round(seconds, 2),
    }
    steps = [{"method": method, "init": init, "lr": lr, "seed": seed, **r} for r in trajectory]
    return row, result.model, steps


def choose_lr(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's choice (see the module docstring)."""
    reached = [r for r in runs if r["reached"]]
    if not reached:
        return min(runs, key=lambda r: r["forget_acc"])
    best = max(r["retain_score_tf"] for r in reached)
    return min((r for r in reached if r["retain_score_tf"] >= best - 1e-3), key=lambda r: r["final_step"])


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows, before: dict[str, float], budget: int, configs) -> list[dict[str, Any]]:
    summary = []
    for method, init in configs:
        runs = [r for r in rows if r["method"] == method and r["init"] == init]
        if not runs:
            continue
        reached = [r for r in runs if r["reached"]]
        row: dict[str, Any] = {
            "method": method,
            "init": init,
            "lr": runs[0]["lr"],
            "seeds": len(runs),
            "reached": f"{len(reached)}/{len(runs)}",
            "budget_steps": budget,
        }
        steps = [r["steps_to_threshold"] for r in reached]
        row["steps_mean"], row["steps_std"] = _ms(steps) if steps else (None, None)
        # With --patience, training goes on past the first crossing: where the kept state and the run end.
        for key in ("kept_step", "final_step"):
            row[f"{key}_mean"], row[f"{key}_std"] = _ms([r[key] for r in runs])
        for key in ("forget_acc", "forget_rougeL", "forget_quality", "eval_fraction"):
            row[f"{key}_mean"], row[f"{key}_std"] = _ms([r[key] for r in runs])
        for key in ("retain_prob", "model_utility", "utility_prob_rouge"):
            row[f"{key}_ratio_mean"], row[f"{key}_ratio_std"] = _ms([r[key] / before[key] for r in runs])
        summary.append(row)
    return summary


def plot(trajectories, runs, threshold: dict[str, float], configs, path: Path) -> None:
    """The forget-vs-retain trade-off, one panel per initialisation: each method's path over the
    evaluations (forget accuracy against retain probability, the mean over seeds at each evaluated
    step) and a marker at its stopping point (the kept state, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = sorted({i for _, i in configs}, key=["lora", "fila", "full"].index)
    methods = sorted({m for m, _ in configs}, key=list(METHODS).index)
    colors = dict(zip(methods, plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]))
    fig, axes = plt.subplots(1, len(inits), figsize=(6.5 * len(inits), 5.5), squeeze=False)
    for ax, init in zip(axes[0], inits, strict=True):
        for method in methods:
            points = [r for r in trajectories if (r["method"], r["init"]) == (method, init)]
            kept = [r for r in runs if (r["method"], r["init"]) == (method, init)]
            if not points:
                continue
            steps = sorted({r["step"] for r in points})
            seeds = {r["seed"] for r in points}
            line = [[r for r in points if r["step"] == step] for step in steps]
            line = [at for at in line if len(at) == len(seeds)]  # steps every seed evaluated
            x = [statistics.mean(r["forget.acc"] for r in at) for at in line]
            y = [statistics.mean(r["retain.prob"] for r in at) for at in line]
            ax.plot(x, y, "-", color=colors[method], alpha=0.6, lw=1.2)
            ax.plot(
                statistics.mean(r["forget_acc"] for r in kept),
                statistics.mean(r["retain_prob_tf"] for r in kept),
                "o", ms=8, color=colors[method], markeredgecolor="black", label=method,
            )  # fmt: skip
        ax.axvline(threshold["acc"], color="black", linestyle=":", label="retain-only model (the rule)")
        ax.invert_xaxis()  # forgetting moves right
        ax.set_xlabel("forget accuracy (teacher forced; lower = forgotten)")
        ax.set_ylabel("retain probability (32 retain items)")
        ax.set_title(f"{init}: path over evaluations, marker at the stop")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Forget vs retain on the synthetic TOFU set, stopped by the tofu rule (mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _pm(mean: float | None, std: float | None, fmt: str = ".2f") -> str:
    return "—" if mean is None else f"{mean:{fmt}} ± {std:{fmt}}"


def markdown(summary, meta) -> str:
    lines = [
        "| method | init | lr | reached | steps to threshold | forget acc | forget ROUGE-L "
        "| retain prob (× before) | retain utility (× before) | utility w/o truth ratio (× before) "
        "| forget quality (KS p) | eval overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        steps = (
            f"> {r['budget_steps']}"
            if r["steps_mean"] is None
            else _pm(r["steps_mean"], r["steps_std"], ".1f")
        )
        lines.append(
            f"| {r['method']} | {r['init']} | {r['lr']:g} | {r['reached']} | {steps} "
            f"| {_pm(r['forget_acc_mean'], r['forget_acc_std'], '.3f')} "
            f"| {_pm(r['forget_rougeL_mean'], r['forget_rougeL_std'], '.3f')} "
            f"| {_pm(r['retain_prob_ratio_mean'], r['retain_prob_ratio_std'], '.3f')} "
            f"| {_pm(r['model_utility_ratio_mean'], r['model_utility_ratio_std'], '.3f')} "
            f"| {_pm(r['utility_prob_rouge_ratio_mean'], r['utility_prob_rouge_ratio_std'], '.3f')} "
            f"| {_pm(r['forget_quality_mean'], r['forget_quality_std'], '.3g')} "
            f"| {100 * r['eval_fraction_mean']:.0f} % |"
        )
    b, ref, t = meta["before"], meta["retain_only"], meta["threshold"]
    notes = [
        f"Rule: forget accuracy ≤ {t['acc']:.3f} and forget ROUGE-L ≤ {t['rougeL']:.3f}, the retain-only",
        f"model's values on the forget set, evaluated every {meta['eval_every']}",
        f"(an epoch: {meta['steps_per_epoch']} optimiser steps, batch {meta['batch_size']}) on",
        f"{meta['eval_items']};",
        *(
            [
                f"the run goes on for {meta['patience']} evaluations past the first that satisfies the rule",
                f"and keeps the {meta['restore']} state among those that satisfy it;",
            ]
            if meta["patience"]
            else []
        ),
        f"at most {meta['epochs']} epochs. Learning rate: the best of {meta['lr_grid']} (× the base rate",
        f"{meta['lr']:g} for LoRA/FILA, {meta['lr'] / 10:g} for full fine-tuning) in a sweep with seed",
        f"{meta['sweep_seed']}; mean ± std over seeds 0–{meta['seeds'] - 1}. Steps to threshold: over the",
        "runs that reached it. The other columns describe the state kept (the stopped one, or the last",
        "when the rule never held), scored with the TOFU protocol on",
        f"{meta['items']}. Before unlearning: retain prob {b['retain_prob']:.3f}, retain utility",
        f"{b['model_utility']:.3f}, utility w/o truth ratio {b['utility_prob_rouge']:.3f}, forget quality",
        f"{b['forget_quality']:.2g}. Retain-only model: forget prob {ref['forget_prob']:.3f}, retain utility",
        f"{ref['model_utility']:.3f}. Eval overhead: seconds evaluating during training / seconds training.",
        *(
            [f"Method options beyond the presets: {meta['method_options']}."]
            if meta.get("method_options")
            else []
        ),
        f"{meta['device']}; {meta['date']}; {meta['total_s']:.0f} s in all.",
    ]
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="demo size (default: small)")
    p.add_argument("--cache-dir", default=None, help="demo cache directory")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the demo data and models")
    p.add_argument("--seeds", type=int, default=5, help="reported seeds per configuration (0, 1, ...)")
    p.add_argument("--sweep-seed", type=int, default=100, help="seed of the learning-rate sweep")
    p.add_argument(
        "--lr-factors", default="1,3,10", help="sweep: multiples of the base learning rate (default: 1,3,10)"
    )
    p.add_argument(
        "--epochs", type=float, default=None, help="at most this many epochs (default: the demo's)"
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma list like ihl-fila,npo+kl-lora (default: every method x lora, fila)",
    )
    p.add_argument("--retain-items", type=int, default=42, help="retain items scored with the TOFU protocol")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length of the TOFU scoring")
    p.add_argument(
        "--eval-every", default="epoch", help="evaluate every N optimiser steps or epoch (default: epoch)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    for name in ("model", "retain-model", "forget", "retain", "eval-forget", "eval-retain", "template"):
        p.add_argument(f"--{name}", default=None, help="instead of the demo: local path / template name")
    p.add_argument("--lr", type=float, default=None, help="base learning rate")
    p.add_argument("--tag", default=None, help="suffix of the result files' names (another grid, ...)")
    p.add_argument("--patience", type=int, default=0, help="unlearn's --patience (default 0: stop at once)")
    p.add_argument(
        "--restore", default="first", choices=("first", "best", "last"), help="unlearn's --restore"
    )
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", category=FutureWarning)

    inputs = local_inputs(args) if args.model else demo_inputs(args.size, args.cache_dir, args.data_seed)
    options = inputs["options"]
    for key, value in (
        ("learning_rate", args.lr),
        ("lora_r", args.lora_r),
        ("max_length", args.max_length),
        ("num_epochs", args.epochs),
    ):
        if value is not None:
            options[key] = value
    options["lora_alpha"] = 2 * options["lora_r"]
    every = "epoch" if args.eval_every == "epoch" else int(args.eval_every)
    stem = "quality" if every == "epoch" else f"quality_every{every}"
    if args.patience or args.restore != "first":
        stem += f"_patience{args.patience}_{args.restore}"
    stem += f"_{args.tag}" if args.tag else ""
    stopping = {"patience": args.patience, "restore": args.restore}
    configs = CONFIGS if not args.configs else [tuple(c.rsplit("-", 1)) for c in args.configs.split(",")]
    factors = [float(f) for f in args.lr_factors.split(",")]

    # The retain-only model gives the forget-quality reference and the rule's values.
    ref_model, tokenizer = load_model_and_tokenizer(inputs["retain_model"])
    probe = TofuProbe(
        tokenizer,
        inputs["forget"],
        inputs["retain"],
        template=options["template"],
        max_length=options["max_length"],
        reference=None,
        retain_items=args.retain_items,
        max_new_tokens=args.max_new_tokens,
    )
    ref_metrics, ref_ratios = probe(ref_model)
    ref_metrics["forget_quality"] = M.forget_quality(ref_ratios, ref_ratios)
    probe.reference = ref_ratios
    full_model, _ = load_model_and_tokenizer(inputs["model"], tokenizer)
    before, _ = probe(full_model)
    del ref_model, full_model
    evaluator = rule_evaluator(inputs, tokenizer)
    rule, threshold = tofu_rule(inputs, tokenizer, evaluator)
    print(f"rule {rule}\nretain-only model: {ref_metrics}\nbefore unlearning: {before}", flush=True)

    runs: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    chosen: dict[tuple[str, str], float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastunlearn-bench-quality-") as out_root:
        for method, init in configs:
            base = options["learning_rate"] / (10 if init == "full" else 1)
            sweep = []
            for factor in factors:
                row, _, _ = run_one(
                    inputs, tokenizer, rule, method, init, base * factor, args.sweep_seed, out_root, every,
                    **stopping,
                )  # fmt: skip
                sweep.append(row)
                runs.append({"phase": "sweep", **row})
                print(
                    f"sweep {method:>3}+{init:<4} lr {row['lr']:<7g}: reached {row['reached']!s:<5} "
                    f"step {row['final_step']:>3}  retain score {row['retain_score_tf']:.3f}  "
                    f"({row['run_s']:.0f} s)",
                    flush=True,
                )
            chosen[(method, init)] = choose_lr(sweep)["lr"]
            for seed in range(args.seeds):
                row, model, steps = run_one(
                    inputs, tokenizer, rule, method, init, chosen[(method, init)], seed, out_root, every,
                    **stopping,
                )  # fmt: skip
                scored, _ = probe(model)
                # The rule's own numbers for the kept state (ROUGE-L is not computed far from the rule).
                kept = evaluator.evaluate(model, {"forget.acc", "forget.rougeL"})
                row.update(scored, forget_acc=kept["forget.acc"], forget_rougeL=kept["forget.rougeL"])
                runs.append({"phase": "report", **row})
                trajectories.extend(steps)
                print(
                    f"      {method:>3}+{init:<4} lr {row['lr']:<7g} seed {seed}: "
                    f"reached {row['reached']!s:<5} "
                    f"step {row['final_step']:>3}  retain prob {row['retain_prob']:.3f}  "
                    f"utility {row['model_utility']:.3f}  FQ {row['forget_quality']:.3g}  "
                    f"eval {100 * row['eval_fraction']:.0f} %  ({row['run_s']:.0f} s)",
                    flush=True,
                )
    total = time.perf_counter() - start
    n_forget = len(fdata.load_records(inputs["train_forget"])[0])
    steps_per_epoch = math.ceil(n_forget / options["batch_size"])
    budget = math.ceil(options["num_epochs"] * steps_per_epoch)
    reported = [r for r in runs if r["phase"] == "report"]
    summary = summarise(reported, before, budget, configs)
    env = environment(torch.device("cpu"))
    env.update(total_s=round(total, 1), note="shared 2-core CPU; timings include other processes' load")
    write_results(f"{stem}_runs", runs, env)
    write_results(f"{stem}_summary", summary, env)
    write_results(f"{stem}_trajectories", trajectories, env)
    meta = {
        "rule": rule,
        "threshold": threshold,
        "before": before,
        "retain_only": ref_metrics,
        "seeds": args.seeds,
        "sweep_seed": args.sweep_seed,
        "lr_grid": factors,
        "lr": options["learning_rate"],
        "chosen_lr": {f"{m}-{i}": lr for (m, i), lr in chosen.items()},
        "method_options": {m: o for m, o in METHOD_OPTIONS.items() if any(m == c for c, _ in configs)},
        "epochs": options["num_epochs"],
        "batch_size": options["batch_size"],
        **stopping,
        "steps_per_epoch": steps_per_epoch,
        "eval_every": "epoch" if every == "epoch" else f"{every} optimiser steps",
        "eval_items": f"{min(n_forget, EVAL_ITEMS)} forget and {EVAL_ITEMS} retain items",
        "device": env["device"],
        "date": env["date"],
        "total_s": total,
        "items": f"{len(probe.sets['forget'])} forget and {len(probe.sets['retain'])} retain items",
    }
    write_json(RESULTS_DIR / f"{stem}.json", {"environment": env, "meta": meta, "summary": summary})
    plot(trajectories, reported, threshold, configs, RESULTS_DIR / f"{stem}.png")
    table = markdown(summary, meta)
    write_text(RESULTS_DIR / f"{stem}.md", table)
    print("\n" + table + f"\ntotal {total:.0f} s")


if __name__ == "__main__":
    main()
