"""What evaluating during training costs, against the training it watches, as the forget set grows.

``unlearn(stop=...)`` evaluates a fixed amount at every evaluation — at most ``--eval-items`` (32)
examples per set, teacher-forced, and the greedy answers of the forget subset where the rule's
teacher-forced bounds hold — while an epoch trains on the whole forget set. The overhead (seconds
evaluating during training / seconds training, both measured inside the run by the stopping
callback) therefore falls as the forget set grows. This benchmark measures it for IHL + FILA,
evaluating every epoch at the default ``--eval-items``, on the demo's memorising model and data shapes:

- ``demo``: the demo's own data, 21 forget / 189 retain items: an evaluation scores more examples
  (21 + 32) than an epoch trains on (21 forget + 21 retain);
- ``issue``: 84 forget / 399 retain items, the shape of the TOFU run that motivated the stopping rules
  (80 forget / 400 retain questions);
- ``forget10``: 399 forget / 3598 retain items, the shape of TOFU's forget10 split (400 of 4000).

The larger shapes are new synthetic authors from the demo's generator (the same facts and words): the
model has not memorised them, which does not change what a forward pass costs. Each shape is run in
two modes with the ``tofu`` rule given values no run reaches (so every run trains its whole budget):

- ``teacher-forced``: ``generate_within=0``, the default: the rule's teacher-forced bound never holds,
  so no evaluation generates — the cost of every evaluation before the crossing;
- ``+ generation``: ``generate_within`` so wide that every evaluation also generates the forget
  subset's greedy answers (ROUGE-L) — the cost of an evaluation at the crossing, and of every
  evaluation with ``--patience`` past it.

A default run pays the first at every evaluation and the second at the one or few where the rule's
teacher-forced bounds hold. Modes are interleaved over ``--repeats`` runs; medians are reported.

    python benchmarks/bench_eval_overhead.py            # ~2 minutes on one CPU core

Writes ``benchmarks/results/eval_overhead_<device>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from _common import RESULTS_DIR, ResultLog, environment, slug

from fastunlearn import data as fdata
from fastunlearn.demo import generate_dataset

# name -> (forget authors, retain authors, epochs); 7 question/answer items per author.
SHAPES = {"demo": None, "issue": (12, 57, 5), "forget10": (57, 514, 2)}
EPOCHS_DEMO = 10  # the demo's budget
UNREACHABLE = "tofu:acc=0.0001,rougeL=0.0001"
MODES = {"teacher-forced": 0.0, "+ generation": 1e9}


def shape_data(name: str, demo_paths: dict[str, str]) -> tuple[object, object, float]:
    """Forget and retain records (paths or lists) and the epochs of shape ``name``."""
    if SHAPES[name] is None:
        return demo_paths["forget"], demo_paths["retain"], EPOCHS_DEMO
    n_forget, n_retain, epochs = SHAPES[name]
    n = n_forget + n_retain
    # Half an author below n_forget / n: ceil() in generate_dataset then gives exactly n_forget.
    data = generate_dataset(n, seed=1, forget_fraction=(n_forget - 0.5) / n)
    return data["forget"], data["retain"], epochs


def run(model_path, tokenizer, forget, retain, epochs, generate_within, options, out_dir) -> dict:
    from fastunlearn.training.pipeline import unlearn

    result = unlearn(
        model_path,
        tokenizer,
        forget,
        retain,
        method="ihl",
        init="fila",
        output_dir=out_dir,
        stop=UNREACHABLE,
        generate_within=generate_within,
        **{**options, "eval_every": "epoch", "num_epochs": epochs, "logging_steps": 1000},
        progress=False,
        evaluate=False,
        overwrite=True,
    )
    s = result.metrics["stopping"]
    return {
        "steps": result.metrics["train"]["global_step"],
        "evaluations": s["evaluations"],
        "eval_s": s["eval_s"],
        "train_s": s["train_s"],
        "eval_fraction": s["eval_fraction"],
        "eval_items": s["eval_items"],
    }


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in MODES:
        pts = sorted((r["forget_items"], 100 * r["eval_fraction"]) for r in rows if r["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"every evaluation {mode}")
    ax.axhline(20, color="grey", ls="--", lw=1, label="target: 20 %")
    ax.set_xscale("log")
    ticks = {r["forget_items"]: f"{r['forget_items']}\n({r['shape']})" for r in rows}
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    ax.set_xlabel("forget items (one epoch between evaluations)")
    ax.set_ylabel("evaluation / training time (%)")
    ax.set_title("Evaluation overhead of unlearn --stop-when, default --eval-items")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--repeats", type=int, default=3, help="runs per shape and mode (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    p.add_argument("--cache-dir", default=None, help="demo cache directory")
    args = p.parse_args()
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; expected {list(SHAPES)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()

    from fastunlearn import demo
    from fastunlearn.demo import unlearn_options
    from fastunlearn.models.loading import load_model_and_tokenizer

    spec = demo.SIZES["small"]
    paths = demo.prepare_models(args.cache_dir or demo.default_cache_dir(), spec, seed=0, progress=False)
    _, tokenizer = load_model_and_tokenizer(paths["full_model"])
    options = unlearn_options(spec, seed=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = ResultLog(f"eval_overhead_{slug(device)}", environment(device))
    start = time.perf_counter()
    summary = []
    with tempfile.TemporaryDirectory(prefix="fastunlearn-bench-eval-") as out_root:
        for shape in shapes:
            forget, retain, epochs = shape_data(shape, paths)
            n_forget, n_retain = (len(fdata.load_records(d)[0]) for d in (forget, retain))
            runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
            for repeat in range(args.repeats):
                for mode, within in MODES.items():
                    out = run(paths["full_model"], tokenizer, forget, retain, epochs, within, options,
                              f"{out_root}/{shape}-{repeat}")  # fmt: skip
                    runs[mode].append(out)
                    log.add({"shape": shape, "mode": mode, "repeat": repeat, "forget_items": n_forget,
                             "retain_items": n_retain, "epochs": epochs,
                             **{k: v for k, v in out.items() if k != "eval_items"}})  # fmt: skip
            for mode, outs in runs.items():
                keys = ("eval_s", "train_s", "eval_fraction")
                med = {k: statistics.median(o[k] for o in outs) for k in keys}
                evaluations = outs[0]["evaluations"]
                row = {
                    "shape": shape,
                    "mode": mode,
                    "forget_items": n_forget,
                    "retain_items": n_retain,
                    "eval_items": outs[0]["eval_items"],
                    "epochs": epochs,
                    "steps": outs[0]["steps"],
                    "evaluations": evaluations,
                    "eval_s_per_evaluation": med["eval_s"] / evaluations,
                    "train_s_per_epoch": med["train_s"] / epochs,
                    "eval_fraction": med["eval_fraction"],
                }
                summary.append(row)
                print(
                    f"{shape:>8} {mode:<15} forget {n_forget:>4}: "
                    f"{row['eval_s_per_evaluation'] * 1e3:6.1f} ms per evaluation, "
                    f"{row['train_s_per_epoch'] * 1e3:7.1f} ms training per epoch: "
                    f"{100 * row['eval_fraction']:.1f} %",
                    flush=True,
                )
    log.finish(summary=summary, total_s=round(time.perf_counter() - start, 1), method="ihl+fila",
               rule=UNREACHABLE, eval_every="epoch", threads=args.threads)  # fmt: skip
    try:
        plot(summary, RESULTS_DIR / f"eval_overhead_{slug(device)}.png")
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
