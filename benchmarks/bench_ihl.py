"""Benchmark the IHL loss: time (forward, forward+backward) and peak memory per backend.

Compared in one run, on the same inputs:
- ``triton``      fused kernels (CUDA only), and ``triton-inplace`` (gradient written over the logits)
- ``torch``       the chunked PyTorch path, and ``torch-inplace``
- ``reference``   the eager formula (``ihl_reference``)
- ``compiled``    ``torch.compile(ihl_reference)``, compiled afresh for each case (below)
- ``paper``       the paper's formulation (softmax, one-hot mask, masked copy)

Every backend gets the same logits, in the case's dtype (bf16 cases: bf16 logits for all of them).
``compiled``: ``torch._dynamo.reset()`` before each case and a new ``torch.compile(fullgraph=True,
dynamic=True)``, with Dynamo told to fail rather than fall back to eager at its recompile limit, so
the column is compiled code in every case (one shared compiled function would hit the limit of 8
recompilations after 8 of the GPU preset's 12 shapes and run the rest eagerly). ``dynamic=True``:
the shape-generic graph of a dtype is compiled once and Inductor's cache serves it to the later
cases; a static compilation per shape would cost minutes of a GPU session.

Peak memory is what the call allocates above the logits and labels already in memory; for
forward+backward that includes the gradient (one logits-sized buffer). On GPU the fused path's
effective bandwidth is reported against a measured device copy bandwidth, counting the bytes the
kernels must move: two reads of the logits and one write of the gradient.

    python benchmarks/bench_ihl.py --preset cpu
    python benchmarks/bench_ihl.py --preset gpu
    python benchmarks/bench_ihl.py --preset dry    # toy sizes on CPU, Triton interpreter: tries the script
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS_DIR, ResultLog, environment, median_time, peak_memory, plot_bars, slug
from _formulations import ihl_paper_formulation, ihl_reference

from fastunlearn import ihl_loss

PRESETS = {
    "cpu": [(4096, 32000, torch.float32), (1024, 128256, torch.float32)],
    "gpu": [
        (n, v, dtype)
        for dtype in (torch.bfloat16, torch.float32)  # bf16 first: what training uses
        for n in (4096, 16384)
        for v in (32000, 50257, 128256)
    ],
    "dry": [(16, 1000, torch.float32), (8, 3001, torch.bfloat16)],
}


def loss_functions(*, triton: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The backends for one case; call once per case (``compiled`` is a fresh compilation)."""
    torch._dynamo.reset()
    for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # the name before torch 2.7
        if hasattr(torch._dynamo.config, flag):
            setattr(torch._dynamo.config, flag, True)
            break
    compiled = torch.compile(ihl_reference, fullgraph=True, dynamic=True)
    fns: dict[str, Callable] = {
        "torch": lambda z, y: ihl_loss(z, y, backend="torch", validate=False),
        "torch-inplace": lambda z, y: ihl_loss(z, y, backend="torch", validate=False, inplace_backward=True),
        "reference": lambda z, y: ihl_reference(z, y),
        "compiled": lambda z, y: compiled(z, y),
        "paper": ihl_paper_formulation,
    }
    if triton:
        fns = {
            "triton": lambda z, y: ihl_loss(z, y, backend="triton", validate=False),
            "triton-inplace": lambda z, y: ihl_loss(
                z, y, backend="triton", validate=False, inplace_backward=True
            ),
            **fns,
        }
    return fns


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in GB/s (read + write counted), from a large ``copy_``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_time(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def bench_case(n, vocab, dtype, name, fn, device, repeats) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=gen, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    labels[::10] = -100
    leaf = logits.requires_grad_()

    def forward():
        with torch.no_grad():
            fn(leaf, labels)

    def forward_backward():
        # In-place variants overwrite the logits with their gradient each call; the values stay
        # small and finite, so later calls time the same work.
        fn(leaf, labels).backward()
        leaf.grad = None

    row = {"n": n, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."), "backend": name}
    try:
        row["fwd_ms"] = median_time(forward, device, repeats=repeats)
        row["fwd_bwd_ms"] = median_time(forward_backward, device, repeats=repeats)
        row["fwd_bwd_peak_bytes"] = peak_memory(forward_backward, device)
        row["logits_bytes"] = logits.numel() * logits.element_size()
        row["extra_peak_vs_logits"] = row["fwd_bwd_peak_bytes"] / row["logits_bytes"]
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as err:  # a backend that fails (e.g. cannot be compiled) is reported, not fatal
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return row


def plot(rows: list[dict], path: Path) -> None:
    plot_bars(
        rows,
        path,
        case=lambda r: (r["n"], r["vocab"], r["dtype"]),
        case_label=lambda c: f"N={c[0]} V={c[1]} {c[2]}",
        series="backend",
        panels=[("fwd_bwd_ms", 1.0, "forward+backward (ms, median)"),
                ("fwd_bwd_peak_bytes", 2.0**-30, "peak extra memory (GiB)")],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the preset; exit status 1 if a backend failed other than by running out of memory."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (on CUDA: at least)")
    parser.add_argument("--backends", nargs="*", help="subset of backends to run (default: all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if args.preset == "dry":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    stem = f"ihl_{slug(device)}" + ("_dry" if args.preset == "dry" else "")
    log = ResultLog(stem, environment(device))
    for n, vocab, dtype in PRESETS[args.preset]:
        fns = loss_functions(triton=device.type == "cuda" or args.preset == "dry")
        for name, fn in fns.items():
            if args.backends and name not in args.backends:
                continue
            row = log.add(bench_case(n, vocab, dtype, name, fn, device, args.repeats))
            gc.collect()  # the case's tensors die with bench_case's frame; hand their memory back
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary = summarise(log.rows, device)
    log.finish(summary=summary)
    plot(log.rows, RESULTS_DIR / f"{stem}.png")
    for line in summary:
        print(line)
    failed = [r for r in log.rows if r.get("error", "out of memory") != "out of memory"]
    for row in failed:
        print(f"FAILED: N={row['n']} V={row['vocab']} {row['dtype']} {row['backend']}: {row['error']}")
    return 1 if failed else 0


def summarise(rows: list[dict], device: torch.device) -> list[str]:
    """The issue's target ratios, each computed from this run's rows."""
    lines = []
    bandwidth = copy_bandwidth(device, 1 << 30) if device.type == "cuda" else None
    if bandwidth:
        lines.append(f"device copy bandwidth: {bandwidth:.0f} GB/s")
    fused = "triton" if device.type == "cuda" else "torch"
    for case in dict.fromkeys((r["n"], r["vocab"], r["dtype"]) for r in rows):
        by = {r["backend"]: r for r in rows if (r["n"], r["vocab"], r["dtype"]) == case and "error" not in r}
        if fused not in by:
            continue
        ours = by[fused]
        text = f"N={case[0]} V={case[1]} {case[2]}: {fused} fwd+bwd {ours['fwd_bwd_ms']:.1f} ms"
        for other in ("reference", "compiled", "paper"):
            if other in by:
                text += f", {ours['fwd_bwd_ms'] / by[other]['fwd_bwd_ms']:.2f}x {other}"
        text += f"; extra peak {ours['extra_peak_vs_logits']:.2f}x logits"
        if f"{fused}-inplace" in by:
            text += f" ({by[f'{fused}-inplace']['extra_peak_vs_logits']:.2f}x in place)"
        if bandwidth:
            moved = 3 * ours["logits_bytes"] / (ours["fwd_bwd_ms"] * 1e-3) / 1e9
            text += f"; {moved:.0f} GB/s = {moved / bandwidth:.0%} of copy bandwidth"
        lines.append(text)
    return lines


if __name__ == "__main__":
    sys.exit(main())
