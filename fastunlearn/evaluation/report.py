"""Plain-text tables of evaluation results for a terminal: :func:`format_table` of
:func:`fastunlearn.evaluate`'s, :func:`summary_table` of an unlearning run's ``metrics.json``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or not math.isfinite(value)):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _rows(
    header: tuple[str, ...], rows: list[tuple[Any, ...]], first: int = 18, width: int = 12
) -> list[str]:
    lines = [f"{header[0]:<{first}}" + "".join(f"{h:>{width}}" for h in header[1:])]
    lines += [f"{r[0]!s:<{first}}" + "".join(f"{_fmt(v):>{width}}" for v in r[1:]) for r in rows]
    return lines


def _tofu(tofu: Mapping[str, Any]) -> list[str]:
    cols = ("num_items", "prob", "accuracy", "rougeL_recall", "truth_ratio", "truth_ratio_mean")
    lines = [f"TOFU ({tofu['mode']} mode, template {tofu['template']!r})"]
    lines += _rows(("set", *cols), [(n, *(s.get(c) for c in cols)) for n, s in tofu["sets"].items()], 14, 18)
    for name, scores in tofu["sets"].items():
        for metric, reason in scores.get("missing", {}).items():
            lines.append(f"  {name} {metric} missing: {reason}")
    k = len(tofu["model_utility_components"])
    if tofu["model_utility"] is not None:
        lines.append(f"model utility   {_fmt(tofu['model_utility'])}  (harmonic mean of all 9 numbers)")
    elif k:
        lines.append(
            f"model utility (partial, {k} of 9)  {_fmt(tofu['model_utility_partial'])}  "
            "(not TOFU's model utility, which needs all 9 numbers)"
        )
    else:
        lines.append("model utility   —  (no retain / real authors / world facts numbers)")
    fq = tofu.get("forget_quality")
    lines.append(f"forget quality  {_fmt(fq)}" + ("" if fq is not None else "  (no reference truth ratios)"))
    return lines


def _extraction(ext: Mapping[str, Any]) -> list[str]:
    n = ext["n"]
    return [
        f"Extraction ({ext['num_sequences']} sequences)",
        f"MA     {_fmt(ext['ma'])}",
        f"EL_{n:<3} {_fmt(ext[f'el_{n}'])}",
    ]


def _privleak(auc: float | None, privleak: float | None, retrained: float | None) -> list[str]:
    if privleak is None:
        return [
            f"Min-K% AUC {_fmt(auc)}; PrivLeak needs the retrained model (--retrain-model or --retrain-auc)"
        ]
    return [
        f"PrivLeak {privleak:+.2f}  (Min-K% AUC {_fmt(auc)} vs the retrained model's {_fmt(retrained)}; "
        "near 0 is right, positive still leaks, strongly negative is over-unlearned)"
    ]


def _mia(mia: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Membership inference ({mia['num_forget']} forget vs {mia['num_holdout']} holdout texts, "
        f"k={mia['k']}; AUC = P(a holdout text scores higher), 0.5 = no signal, 1 = every forget text found)"
    ]
    attacks = [a for a in ("loss", "zlib", "min_k", "min_k_plus_plus", "reference") if a in mia]
    lines += _rows(("attack", "AUC"), [(a, mia[a]["auc"]) for a in attacks])
    return lines + _privleak(mia["min_k"]["auc"], mia.get("privleak"), mia.get("retrain_auc"))


def _muse(muse: Mapping[str, Any]) -> list[str]:
    lines = [f"MUSE ({muse['dir']}; ROUGE-L F1 of greedy answers)"]
    names = [c for c in ("verbmem_forget", "knowmem_forget", "knowmem_retain") if c in muse]
    rows = [(c, muse[c], muse.get(f"{c}_recall"), muse["num_items"][c]) for c in names]
    lines += _rows(("criterion", "F1", "recall", "items"), rows)
    if "privleak_auc" in muse:
        lines += _privleak(muse["privleak_auc"], muse.get("privleak"), muse.get("privleak_retrain_auc"))
    return lines


def _lm_eval(out: Mapping[str, Any]) -> list[str]:
    rows = []
    for task, metrics in out.get("results", {}).items():
        for metric, value in metrics.items():
            if is_lm_eval_score(metric, value):
                name, _, kind = metric.partition(",")
                rows.append((task, name, value, metrics.get(f"{name}_stderr,{kind}")))
    return ["lm-evaluation-harness", *_rows(("task", "metric", "value", "stderr"), rows, 24)]


def is_lm_eval_score(key: str, value: Any) -> bool:
    """A harness score: ``METRIC,FILTER`` with a number, not its standard error."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and "," in key and "_stderr" not in key


def _dialogue(d: Mapping[str, Any]) -> list[str]:
    return [f"Dialogue ({d['num_items']} items)", f"unigram F1 {_fmt(d['f1'])}"]


TABLES: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "tofu": _tofu,
    "extraction": _extraction,
    "mia": _mia,
    "muse": _muse,
    "dialogue": _dialogue,
    "lm_eval": _lm_eval,
}


def format_table(results: Mapping[str, Any]) -> str:
    """One plain-text table per evaluation of :func:`fastunlearn.evaluate`'s ``results``."""
    return "\n\n".join("\n".join(TABLES[name](r)) for name, r in results.items() if name in TABLES and r)


def summary_table(metrics: Mapping[str, Any]) -> str:
    """Before/after table of every metric on forget and retain (or the training summary alone), then
    the tables of the evaluations run after training."""
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
    suite = format_table(metrics.get("after", {}))
    return "\n".join(lines) + (f"\n\nafter training:\n{suite}" if suite else "")


def stopping_line(summary: Mapping[str, Any]) -> str:
    """One line (after a blank one) on where a run's stopping rule held, where training stopped and
    which state was kept, from ``metrics["stopping"]``."""
    if summary["rule"] is None:
        return f"\nevaluated {summary['evaluations']} times during training (no stopping rule)"
    if not summary["satisfied"]:
        return f"\n{summary['rule']}: never satisfied; kept the final state (step {summary['kept_step']})"
    return (
        f"\n{summary['rule']}: first held at step {summary['first_satisfied_step']}, stopped at step "
        f"{summary['stopped_step']}, kept step {summary['kept_step']} ({summary['restore']})"
    )
