"""Benchmark FILA's solver: the truncated SVD (fastunlearn.fisher.solver) vs a full SVD.

FILA (Cha et al. 2025) needs the top ``r`` singular triplets of ``diag(d)·W`` for every adapted layer. This
times, for each distinct layer shape of Llama-2-7B (4096×4096 for q/k/v/o, 11008×4096 for gate/up,
4096×11008 for down), at ``r = 32``:

- ``full``       ``torch.linalg.svd(A, full_matrices=False)`` in fp32, then truncated (what
                 ``fila_factors(solver="svd")`` does today);
- ``truncated``  :func:`fastunlearn.fisher.solver.solve_truncated_svd` (fp32 Krylov phase, fp64 final
                 Rayleigh–Ritz), with its iterations and the accuracy of its result:
                 ``err_truncated / err_full − 1`` with ``err = ‖A − U·diag(S)·Vᵀ‖_F`` in fp64 (the full
                 fp32 SVD is within rounding of the Eckart–Young optimum, so this is the solver's excess).

Matrices (no real checkpoint is available offline): ``W`` Gaussian with std 0.02 — a flat
Marchenko–Pastur spectrum, the slowest case for a Krylov method — and FILA-like ``diag(d)·W`` with ``d``
log-normal (``exp(N(0, 1))``, about two and a half decades across the rows), a decaying spectrum.
Real fine-tuned weights sit between the two; the full SVD's time does not depend on the spectrum.

The all-layer figure is an extrapolation and labelled so: ``32 × (4·t(4096×4096) + 2·t(11008×4096) +
t(4096×11008))`` from the per-shape medians measured here — each shape measured, not scaled.

CPU runs use 2 threads (``torch.set_num_threads(2)``); the machine is shared, so medians over repeats.

    python benchmarks/bench_fila_solver.py                 # CPU, writes results/fila_solver_cpu.{csv,json}
    python benchmarks/bench_fila_solver.py --device cuda   # results/fila_solver_<gpu>.{csv,json}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, slug, write_results

from fastunlearn.fisher.solver import solve_truncated_svd

RANK = 32
# Llama-2-7B: hidden 4096, intermediate 11008, 32 decoder layers; [out, in] of each adapted linear.
SHAPES = {"attn q/k/v/o": (4096, 4096), "mlp gate/up": (11008, 4096), "mlp down": (4096, 11008)}
PER_LAYER = {"attn q/k/v/o": 4, "mlp gate/up": 2, "mlp down": 1}
LAYERS = 32


def make_matrix(shape: tuple[int, int], kind: str, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=gen) * 0.02
    if kind == "row-weighted":
        W = torch.exp(torch.randn(shape[0], generator=gen))[:, None] * W
    return W.to(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def error(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> float:
    A64 = A.double()
    return float((A64 - (U.double() * S.double()) @ V.double().t()).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="truncated-solver repeats (median)")
    parser.add_argument("--full-repeats", type=int, default=2, help="full-SVD repeats (median)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(device)
    rows = []
    for name, shape in SHAPES.items():
        full_time = None
        for kind in ("row-weighted", "gaussian"):
            A = make_matrix(shape, kind, device)
            if full_time is None or device.type == "cuda":
                full_time, (U, S, Vh) = timed(
                    lambda A=A: torch.linalg.svd(A, full_matrices=False), device, args.full_repeats
                )
            else:  # the full SVD's time does not depend on the spectrum: measured once per shape on CPU
                U, S, Vh = torch.linalg.svd(A, full_matrices=False)
            err_full = error(A, U[:, :RANK], S[:RANK], Vh[:RANK].t())
            del U, S, Vh
            t, res = timed(lambda A=A: solve_truncated_svd(A, RANK), device, args.repeats)
            row = {
                "shape": f"{shape[0]}x{shape[1]}",
                "layers": name,
                "matrix": kind,
                "rank": RANK,
                "full_svd_s": round(full_time, 3),
                "truncated_s": round(t, 3),
                "speedup": round(full_time / t, 1),
                "method": res.method,
                "iterations": res.iterations,
                "krylov_dim": res.krylov_dim,
                "relative_excess_vs_full": float(f"{error(A, res.U, res.S, res.V) / err_full - 1:.3e}"),
            }
            rows.append(row)
            print(row, flush=True)
    for kind in ("row-weighted", "gaussian"):
        per = {r["layers"]: r for r in rows if r["matrix"] == kind}
        total = {
            key: LAYERS * sum(PER_LAYER[name] * per[name][key] for name in SHAPES)
            for key in ("full_svd_s", "truncated_s")
        }
        row = {
            "shape": "llama2-7b (224 layers), extrapolated: 32 × (4·t_qkvo + 2·t_gate/up + t_down)",
            "layers": "all",
            "matrix": kind,
            "rank": RANK,
            "full_svd_s": round(total["full_svd_s"], 1),
            "truncated_s": round(total["truncated_s"], 1),
            "speedup": round(total["full_svd_s"] / total["truncated_s"], 1),
        }
        rows.append(row)
        print(row, flush=True)
    env["threads"] = torch.get_num_threads()
    env["load_average_1_5_15min"] = os.getloadavg()  # the machine is shared: context for the timings
    paths = write_results(f"fila_solver_{slug(device)}", rows, env)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
