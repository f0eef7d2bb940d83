"""The trajectory of a run that evaluates during training: ``trajectory.csv`` and ``trajectory.png``.
One row per evaluation (step 0: before unlearning), columns ``step``, ``epoch``, the metrics, then
:data:`TRAILING`; rewritten whole and atomically after every row, so the header covers every row."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fastunlearn._io import atomic_file, write_text
from fastunlearn.evaluation.stopping.rules import KINDS, METRIC_NAMES, Bound, is_retain, kind_of

LEADING = ("step", "epoch")
# The training loss logged at the step (its mean since the previous log), whether the rule held, the
# best-restore criterion, seconds spent evaluating.
TRAILING = ("loss", "forget_loss", "retain_loss", "satisfied", "retain_score", "eval_s")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


class Trajectory:
    """Evaluation rows kept in memory and, with a ``path``, written to a CSV file after each append."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.rows: list[dict[str, Any]] = []

    def append(self, row: Mapping[str, Any]) -> None:
        """Add one evaluation (it needs ``step``) and rewrite the file atomically."""
        if "step" not in row:
            raise ValueError(f"a trajectory row needs a 'step', got {sorted(row)}")
        self.rows.append(dict(row))
        self.write()

    def update_last(self, values: Mapping[str, Any]) -> None:
        """Add ``values`` to the last row (numbers that arrive after the evaluation: the logged loss)."""
        self.rows[-1].update(values)
        self.write()

    def write(self) -> None:
        """Write the rows held now (a resumed run's replace what an interrupted one left after them)."""
        if self.path is None:
            return
        names = {key for row in self.rows for key in row}
        known = [*LEADING, *METRIC_NAMES, *TRAILING]
        columns = [c for c in known if c in names] + sorted(names - set(known))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for row in self.rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        write_text(self.path, out.getvalue())


def _parse_cell(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def read_trajectory(path: str | os.PathLike) -> list[dict[str, float | str | None]]:
    """The rows of a ``trajectory.csv``: numbers as floats (``step`` as int), empty cells as ``None``,
    anything else as text."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = []
        for raw in csv.DictReader(f):
            row = {k: _parse_cell(v) for k, v in raw.items()}
            row["step"] = int(row["step"])
            rows.append(row)
    return rows


_COLOURS = {kind: f"C{i}" for i, kind in enumerate(KINDS)}
_kind = lambda name: name.partition(".")[2]
_MARK_STYLES = ("-.", "--", ":")


def plot_trajectory(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    bounds: Sequence[Bound] = (),
    marks: Mapping[str, int | None] | None = None,
    title: str | None = None,
) -> None:
    """Draw forget (solid) and retain (dashed) metrics over optimiser steps, one colour per kind, the
    rule's bounds dotted in their metric's colour, ``marks`` (label → step) as vertical lines, and the
    training loss and NLL in a second panel; written atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(name: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None and math.isfinite(r[name])]
        return [p[0] for p in pts], [p[1] for p in pts]

    # Rates share one axis; the NLL is unbounded and drawn with the loss instead.
    rates = [m for m in METRIC_NAMES if kind_of(m).upper == 1.0 and series(m)[0]]
    losses = [n for n in ("loss", "forget_loss", "retain_loss", "forget.nll", "retain.nll") if series(n)[0]]
    fig = Figure(figsize=(9, 7 if losses else 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if losses else 1, 1, 1)
    for name in rates:
        style = "--" if is_retain(name) else "-"
        ax.plot(*series(name), style, marker="o", markersize=3, color=_COLOURS[_kind(name)], label=name)
    for bound in bounds:
        ax.axhline(bound.value, linestyle=":", color=_COLOURS[_kind(bound.metric)], label=f"rule: {bound}")
    for i, (label, step) in enumerate((marks or {}).items()):
        if step is not None:
            style = _MARK_STYLES[i % len(_MARK_STYLES)]
            ax.axvline(step, linestyle=style, color="black", alpha=0.6, label=f"{label} (step {step})")
    ax.set_ylabel("metric (mean over the evaluated subset)")
    ax.set_title(title or "", fontsize=9)
    axes = [ax]
    if losses:
        axes.append(fig.add_subplot(2, 1, 2, sharex=ax))
        for name in losses:
            axes[1].plot(*series(name), "--" if "retain" in name else "-", marker=".", label=name)
        axes[1].set_ylabel("loss / NLL")
    for a in axes:
        a.set_xlabel("optimiser step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png"))
