"""Benchmark the IHL loss: time (forward, forward+backward) and peak memory per backend.

Compared in one run, on the same inputs:
- ``triton``      fused kernels (CUDA only), and ``triton-inplace`` (gradient written over the logits)
- ``torch``       the chunked PyTorch path, and ``torch-inplace``
- ``reference``   the eager formula (``ihl_reference``)
- ``compiled``    ``torch.compile(ihl_reference)``
- ``paper``       the paper's formulation (softmax, one-hot mask, masked copy)

Peak memory is what the call allocates above the logits and labels already in memory; for
forward+backward that includes the gradient (one logits-sized buffer). On GPU the fused path's
effective bandwidth is reported against a measured device copy bandwidth, counting the bytes the
kernels must move: two reads of the logits and one write of the gradient.

    python benchmarks/bench_ihl.py --preset cpu
    python benchmarks/bench_ihl.py --preset gpu
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS_DIR, environment, median_time, peak_memory, plot_bars, slug, write_results

from fastunlearn import ihl_loss, ihl_paper_formulation, ihl_reference

PRESETS = {
    "cpu": [(4096, 32000, torch.float32), (1024, 128256, torch.float32)],
    "gpu": [
        (n, v, dtype)
        for dtype in (torch.float32, torch.bfloat16)
        for n in (4096, 16384)
        for v in (32000, 50257, 128256)
    ],
}


def loss_functions(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    compiled = torch.compile(ihl_reference, dynamic=False)
    fns: dict[str, Callable] = {
        "torch": lambda z, y: ihl_loss(z, y, backend="torch", validate=False),
        "torch-inplace": lambda z, y: ihl_loss(z, y, backend="torch", validate=False, inplace_backward=True),
        "reference": lambda z, y: ihl_reference(z, y),
        "compiled": lambda z, y: compiled(z, y),
        "paper": ihl_paper_formulation,
    }
    if device.type == "cuda":
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="*", help="subset of backends to run (default: all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    fns = loss_functions(device)
    if args.backends:
        fns = {k: v for k, v in fns.items() if k in args.backends}
    env = environment(device)
    rows = []
    for n, vocab, dtype in PRESETS[args.preset]:
        for name, fn in fns.items():
            row = bench_case(n, vocab, dtype, name, fn, device, args.repeats)
            gc.collect()  # the case's tensors die with bench_case's frame; hand their memory back
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary = summarise(rows, device)
    env["summary"] = summary
    stem = f"ihl_{slug(device)}"
    write_results(stem, rows, env)
    plot(rows, RESULTS_DIR / f"{stem}.png")
    for line in summary:
        print(line)


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
    main()
