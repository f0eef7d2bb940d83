"""Plain-text tables of evaluation results for a terminal.

:func:`format_table` renders :func:`fastunlearn.evaluate` results (TOFU and extraction);
:func:`summary_table` the before/after metrics of an :func:`fastunlearn.unlearn` run (its
``metrics.json``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["format_table", "stopping_line", "summary_table"]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or not math.isfinite(value)):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`evaluate` results."""
    lines = []
    tofu = results.get("tofu")
    if tofu:
        cols = ("num_items", "prob", "accuracy", "rougeL_recall", "truth_ratio", "truth_ratio_mean")
        lines.append(f"TOFU ({tofu['mode']} mode, template {tofu['template']!r})")
        lines.append(f"{'set':<14}" + "".join(f"{c:>18}" for c in cols))
        for name, scores in tofu["sets"].items():
            lines.append(f"{name:<14}" + "".join(f"{_fmt(scores.get(c)):>18}" for c in cols))
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
        lines.append(
            f"forget quality  {_fmt(fq)}" + ("" if fq is not None else "  (no reference truth ratios)")
        )
    ext = results.get("extraction")
    if ext:
        if lines:
            lines.append("")
        n = ext["n"]
        lines.append(f"Extraction ({ext['num_sequences']} sequences)")
        lines.append(f"MA     {_fmt(ext['ma'])}")
        lines.append(f"EL_{n:<3} {_fmt(ext[f'el_{n}'])}")
    return "\n".join(lines)


def summary_table(metrics: dict[str, Any]) -> str:
    """Before/after table of every metric on forget and retain (or the training summary alone)."""
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
    return "\n".join(lines)


def stopping_line(summary: Mapping[str, Any]) -> str:
    """One line on where a run's stopping rule held, where training stopped and which state was kept,
    from ``metrics["stopping"]`` (:class:`~fastunlearn.evaluation.stop_callback.StoppingCallback`'s
    summary), after a blank line."""
    if summary["rule"] is None:
        return f"\nevaluated {summary['evaluations']} times during training (no stopping rule)"
    if not summary["satisfied"]:
        return f"\n{summary['rule']}: never satisfied; kept the final state (step {summary['kept_step']})"
    return (
        f"\n{summary['rule']}: first held at step {summary['first_satisfied_step']}, stopped at step "
        f"{summary['stopped_step']}, kept step {summary['kept_step']} ({summary['restore']})"
    )
