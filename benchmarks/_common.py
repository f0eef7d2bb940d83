"""Shared helpers for the benchmarks: device description, timing, peak memory and result files.

Timing (:func:`median_time`): on CUDA, the method of ``triton.testing.do_bench`` — the cost of one call
estimated from a few calls, warm-up calls for ~25 ms, then enough timed calls to fill ~100 ms (at
least ``repeats``), each between its own pair of CUDA events recorded on the stream after the L2 cache
is flushed, and one synchronisation at the end; the median is reported. The events time the GPU's
work; host overhead counts only where it leaves the GPU idle, as it would in real use. On CPU,
``perf_counter`` around each call, the median of ``repeats`` calls after ``warmup``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on
CPU, the allocator has no such counter, so the peak is sampled from the process's resident set
(``/proc/self/status`` VmHWM) after a reset of the high-water mark through ``/proc/self/clear_refs`` —
coarse (page granularity, includes allocator caching) but honest, and it sees every allocation.
``peak_tensor_bytes`` is the exact alternative on CPU: the peak of live PyTorch tensor bytes, from the
profiler's allocation events.

Results (:class:`ResultLog`): every row is written to ``<stem>.csv`` and ``<stem>.json`` as soon as it
is measured (atomically, whole files), so a run stopped by a time limit keeps everything measured so
far; the JSON's ``environment.complete`` says whether the run finished. Files are named after a
sanitised device tag (:func:`slug`). ``FASTUNLEARN_BENCH_RESULTS`` overrides the results directory.
"""

from __future__ import annotations

import csv
import gc
import importlib.metadata
import io
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastunlearn.plan.peak_memory import peak_tensor_bytes  # noqa: F401  (the benchmarks' import)

RESULTS_DIR = Path(os.environ.get("FASTUNLEARN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # The libraries whose code a run executes (transformers' model code, peft's LoRA layers): a timing
    # is comparable only with one measured on the same versions.
    for name in ("triton", "transformers", "peft"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH_BYTES = 256 << 20  # more than any current GPU's L2 cache (H100/H200: 50-60 MB)


def _cuda_times(fn: Callable[[], Any], device: torch.device, calls: int) -> list[float]:
    """Milliseconds of each of ``calls`` calls of ``fn()``, by CUDA events, L2 flushed before each."""
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(calls)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def median_time(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int = 5,
    warmup: int = 1,
    warmup_ms: float = 25.0,
    target_ms: float = 100.0,
    max_repeats: int = 1000,
) -> float:
    """Median time of one ``fn()`` call in milliseconds (see the module docstring).

    On CUDA ``repeats`` and ``warmup`` are minimums: the counts grow until the calls fill ``target_ms``
    and ``warmup_ms`` (at most ``max_repeats`` timed calls). On CPU they are the counts.
    """
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    fn()  # first call: compilation, autotuning, allocator growth
    estimate = max(statistics.median(_cuda_times(fn, device, 3)), 1e-3)
    for _ in range(max(warmup, int(warmup_ms / estimate))):
        fn()
    calls = min(max_repeats, max(repeats, int(target_ms / estimate)))
    return statistics.median(_cuda_times(fn, device, calls))


def call_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one ``fn()`` call: CUDA events (L2 flushed first) on CUDA, ``perf_counter`` on CPU.
    For timing several functions round-robin, where :func:`median_time`'s batches do not fit."""
    if device.type == "cuda":
        return _cuda_times(fn, device, 1)[0]
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _cpu_rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated by ``fn()`` at its peak, above what was in use when it started."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    before = _cpu_rss_bytes("VmRSS:")
    fn()
    return max(0, _cpu_rss_bytes("VmHWM:") - before)


def write_results(stem: str, rows: list[dict[str, Any]], env: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``rows`` to ``results/<stem>.csv`` and, with ``env``, to ``results/<stem>.json``."""
    # Imported here: the rest of this module works before the package is installed (gpu_run.sh asks
    # it for the device tag first).
    from fastunlearn._io import write_json, write_text

    csv_path, json_path = RESULTS_DIR / f"{stem}.csv", RESULTS_DIR / f"{stem}.json"
    fields = list(dict.fromkeys(key for row in rows for key in row))

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(csv_path, table.getvalue())
    write_json(json_path, {"environment": env, "rows": rows})
    return csv_path, json_path


class ResultLog:
    """Rows of one benchmark run, written out after each :meth:`add` (see the module docstring)."""

    def __init__(self, stem: str, env: dict[str, Any]) -> None:
        self.stem, self.env, self.rows = stem, {**env, "complete": False}, []

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append(row)
        write_results(self.stem, self.rows, self.env)
        return row

    def finish(self, **env: Any) -> tuple[Path, Path]:
        """Record ``env`` (a summary, say) and mark the run complete."""
        self.env.update(env, complete=True)
        return write_results(self.stem, self.rows, self.env)


def slug(device: torch.device) -> str:
    """File-name tag for a device: ``cpu``, or the CUDA device's name lower-cased, without a leading
    ``nvidia``, runs of other characters than letters and digits turned into ``-`` (``h200``,
    ``h100-80gb-hbm3``, ``a100-sxm4-40gb``)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def plot_bars(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    case: Callable[[dict[str, Any]], tuple],
    case_label: Callable[[tuple], str],
    series: str,
    panels: Sequence[tuple[str, float, str]],
    log_x: bool = False,
    title: str | None = None,
) -> None:
    """Grouped horizontal bars: a group per ``case(row)``, a bar per value of ``row[series]``, and a
    panel per ``(key, scale, panel title)``; missing values are drawn as 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(case(r) for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.6 * len(cases) + 3), squeeze=False)
    width = 0.8 / max(len(names), 1)
    for ax, (key, scale, panel_title) in zip(axes[0], panels):
        for i, name in enumerate(names):
            values = [
                next((r.get(key, 0) * scale for r in rows if case(r) == c and r[series] == name), 0)
                for c in cases
            ]
            ax.barh([j + i * width for j in range(len(cases))], values, height=width, label=name)
        if log_x:
            ax.set_xscale("log")
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_yticklabels([case_label(c) for c in cases])
        ax.set_title(panel_title)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def free_memory(device: torch.device) -> None:
    """Hand the memory of dead tensors back before a measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    """Median ms of each function, timed round-robin (one call of each per round, after a warm-up
    round) so that drifting load on a shared machine hits every method alike; each call is timed by
    :func:`call_time` (CUDA events on CUDA)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            ms = call_time(fn, device)
            if round_:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}
