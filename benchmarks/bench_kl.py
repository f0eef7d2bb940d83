"""Benchmark the KL retain term ``KL(P_ref ‖ P_θ)`` (TOFU's and open-unlearning's ``kl``): time and peak.

Two levels, forward and backward, on the same inputs:

- from logits (given ``z`` and the reference's ``r``, ``[N, V]``):
  ``kl_div``  ``F.kl_div(log_softmax(z), log_softmax(r), reduction="batchmean", log_target=True)``;
  ``kl_loss`` :func:`fastunlearn.kl_loss`.
- from hidden states (``h``, the reference's ``h_ref``, a frozen head ``W``; the reference logits are
  computed under ``no_grad``, as a reference model's are):
  ``eager``  ``z = h Wᵀ``, ``r = h_ref Wᵀ``, then ``kl_div`` (two logits, two log-softmaxes);
  ``kl_loss`` the same logits, then :func:`fastunlearn.kl_loss`;
  ``fused``  :func:`fastunlearn.fused_linear_kl_loss` (two chunks of logits at a time);
  ``liger``  on CUDA, when ``liger-kernel`` is installed: its fused linear JSD with ``jsd_beta=0``, which
  its kernel computes as ``Σ P_teacher·(log P_teacher − log P_student)`` over rows (``n_non_ignore = N``
  without labels) — ``KL(P_ref ‖ P_θ)`` with the reference as teacher. The run records its relative
  difference from ``fused`` (``liger_vs_fused_rel_diff``) to confirm that reading: a version whose
  kernel has no β = 0 case evaluates the general JSD there, which is identically 0.

Time: medians of ``--repeats`` steps, the paths of a level timed round-robin (``_common``). Peak: bytes a
step allocates above its inputs (CUDA allocator peak; on CPU the peak of live tensor bytes from the
profiler, ``_common.peak_tensor_bytes``). The memory bound checked (``memory_bound`` in the JSON): the
fused path's extra peak at most 0.25× the eager path's at N = 4096, V = 32000, fp32. CPU timings run on
one thread (see bench_loss.py).

    python benchmarks/bench_kl.py --preset cpu     # N=4096, H=2048, V=32000, fp32
    python benchmarks/bench_kl.py --preset gpu     # that, and N=8192, H=4096, V=128256 bf16, with Liger
    python benchmarks/bench_kl.py --preset dry     # toy sizes on CPU (gpu_run.sh's dry run)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    RESULTS_DIR,
    ResultLog,
    environment,
    free_memory,
    interleaved_medians,
    peak_tensor_bytes,
    plot_bars,
    slug,
)

from fastunlearn import fused_linear_kl_loss, kl_loss

PRESETS = {
    "cpu": {"cases": [(4096, 2048, 32000, torch.float32)], "repeats": 3},
    "gpu": {
        "cases": [(4096, 2048, 32000, torch.float32), (8192, 4096, 128256, torch.bfloat16)],
        "repeats": 5,
    },
    # gpu_run.sh's dry run: this script's code path at toy sizes on the CPU.
    "dry": {"cases": [(64, 32, 1001, torch.float32), (48, 32, 3001, torch.bfloat16)], "repeats": 1},
}
MEMORY_CASE = (4096, 32000, "float32")  # (N, V, dtype) of the memory bound
MEMORY_TARGET = 0.25


def kl_div(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return F.kl_div(z.log_softmax(-1), r.log_softmax(-1), reduction="batchmean", log_target=True)


def liger_path() -> tuple[Callable | None, str]:
    """Liger-Kernel's fused linear JSD at ``jsd_beta=0`` (KL(teacher ‖ student)), or why it cannot run."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_jsd
    except ImportError as err:
        return None, f"liger-kernel not importable ({err})"

    def run(h, h_ref, w):
        return liger_fused_linear_jsd(h, w, h_ref, w, jsd_beta=0.0)

    return run, "liger_kernel.transformers.functional.liger_fused_linear_jsd(jsd_beta=0.0)"


def inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """Hidden states, the reference's (a perturbation, as after some training) and a frozen head giving
    logits of standard deviation ~3."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, hidden, generator=gen)
    h_ref = (h + 0.3 * torch.randn(n, hidden, generator=gen)).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * (3 / hidden**0.5)).to(device, dtype)
    return h.to(device, dtype).requires_grad_(), h_ref, w


def hidden_paths(device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    def reference_logits(h_ref, w):
        with torch.no_grad():
            return h_ref @ w.t()

    paths: dict[str, Callable] = {
        "eager": lambda h, h_ref, w: kl_div(h @ w.t(), reference_logits(h_ref, w)),
        "kl_loss": lambda h, h_ref, w: kl_loss(h @ w.t(), reference_logits(h_ref, w)),
        "fused": lambda h, h_ref, w: fused_linear_kl_loss(h, h_ref, w),
    }
    notes = {}
    if device.type == "cuda":
        liger, note = liger_path()
        notes["liger"] = note
        if liger is not None:
            paths["liger"] = liger
    return paths, notes


def measure(steps: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, dict]:
    """Peak bytes (after a warm-up call) and median milliseconds of each step; a failing path is
    reported with its error instead."""
    results: dict[str, dict] = {}
    for name, run in list(steps.items()):
        try:
            run()  # warm-up: one-time allocations (BLAS, Triton compilation) stay out of the peak
            free_memory(device)
            results[name] = {"peak_bytes": peak_tensor_bytes(run, device)}
        except Exception as err:  # a baseline that cannot run here is reported, not fatal
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            del steps[name]
    for name, ms in interleaved_medians(steps, device, repeats).items():
        results[name]["fwd_bwd_ms"] = ms
    return results


def bench_case(n, hidden, vocab, dtype, device, repeats, log: ResultLog) -> None:
    h, h_ref, w = inputs(n, hidden, vocab, dtype, device)
    case = {"n": n, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).removeprefix("torch.")}
    buffer = n * vocab * torch.finfo(dtype).bits // 8

    def step(fn: Callable, *args) -> Callable[[], None]:
        def run() -> None:
            fn(*args).backward()
            args[0].grad = None

        return run

    with torch.no_grad():
        z, r = (h @ w.t()).requires_grad_(), h_ref @ w.t()
    levels = {"logits": {"kl_div": step(kl_div, z, r), "kl_loss": step(kl_loss, z, r)}}
    paths, notes = hidden_paths(device)
    levels["hidden"] = {name: step(fn, h, h_ref, w) for name, fn in paths.items()}
    for level, steps in levels.items():
        for name, result in measure(steps, device, repeats).items():
            row = {**case, "level": level, "path": name, **result, "logits_buffer_bytes": buffer}
            if "peak_bytes" in row:
                row["peak_vs_logits_buffer"] = row["peak_bytes"] / buffer
            log.add(row)
            print(f"  {level} {name}: {row}", flush=True)
    del z, r
    if "liger" in paths:  # the sign and normalisation of Liger's beta = 0, on this case's inputs
        with torch.no_grad():
            ours, theirs = fused_linear_kl_loss(h, h_ref, w).float(), paths["liger"](h, h_ref, w).float()
        log.env.setdefault("liger_vs_fused_rel_diff", {})[str(tuple(case.values()))] = float(
            (theirs - ours).abs() / ours.abs()
        )
    log.env.setdefault("notes", {}).update(notes)


def memory_bound(rows: list[dict]) -> dict | None:
    """The fused path's extra peak against the eager path's at the memory case, if measured."""
    n, vocab, dtype = MEMORY_CASE
    by = {
        r["path"]: r
        for r in rows
        if r["level"] == "hidden" and (r["n"], r["vocab"], r["dtype"]) == MEMORY_CASE
    }
    if "peak_bytes" not in by.get("fused", {}) or "peak_bytes" not in by.get("eager", {}):
        return None
    ratio = by["fused"]["peak_bytes"] / by["eager"]["peak_bytes"]
    return {
        "n": n, "vocab": vocab, "dtype": dtype, "hidden": by["fused"]["hidden"],
        "fused_extra_peak_bytes": by["fused"]["peak_bytes"],
        "eager_extra_peak_bytes": by["eager"]["peak_bytes"],
        "ratio": ratio, "target": MEMORY_TARGET, "met": ratio <= MEMORY_TARGET,
    }  # fmt: skip


def summarise(rows: list[dict]) -> list[str]:
    lines = []
    for case in dict.fromkeys((r["n"], r["hidden"], r["vocab"], r["dtype"], r["level"]) for r in rows):
        by = {r["path"]: r for r in rows if (r["n"], r["hidden"], r["vocab"], r["dtype"], r["level"]) == case}
        base = by.get("kl_div") or by.get("eager")
        parts = []
        for name, row in by.items():
            if "error" in row:
                parts.append(f"{name}: {row['error']}")
                continue
            text = f"{name} {row['fwd_bwd_ms']:.1f} ms, peak {row['peak_bytes'] / 2**20:.0f} MiB"
            if base is not None and "fwd_bwd_ms" in base and row is not base:
                text += (f" ({row['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x time, "
                         f"{row['peak_bytes'] / base['peak_bytes']:.3f}x peak)")  # fmt: skip
            parts.append(text)
        lines.append(f"N={case[0]} H={case[1]} V={case[2]} {case[3]}, from {case[4]}: " + "; ".join(parts))
    return lines


def plot(rows: list[dict], path: Path) -> None:
    plot_bars(
        [r for r in rows if "fwd_bwd_ms" in r],
        path,
        case=lambda r: (r["n"], r["hidden"], r["vocab"], r["dtype"], r["level"]),
        case_label=lambda c: f"N={c[0]} H={c[1]} V={c[2]}\n{c[3]}, from {c[4]}",
        series="path",
        panels=[("fwd_bwd_ms", 1.0, "forward+backward (ms, median)"),
                ("peak_vs_logits_buffer", 1.0, "extra peak (x one logits buffer)")],
        title="KL(P_ref || P_theta) retain term",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, help="timed steps per path (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, see bench_loss.py)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    env = environment(device)
    env["memory"] = "CUDA allocator peak" if device.type == "cuda" else "peak of live PyTorch tensor bytes"
    log = ResultLog(f"kl_{slug(device)}" + ("_dry" if args.preset == "dry" else ""), env)
    for n, hidden, vocab, dtype in preset["cases"]:
        print(f"N={n} H={hidden} V={vocab} {dtype}", flush=True)
        bench_case(n, hidden, vocab, dtype, device, args.repeats or preset["repeats"], log)
        free_memory(device)
    summary = summarise(log.rows)
    bound = memory_bound(log.rows)
    log.finish(summary=summary, memory_bound=bound)
    plot(log.rows, RESULTS_DIR / f"{log.stem}.png")
    for line in summary:
        print(line)
    if bound is not None:
        print(f"memory bound: fused extra peak {bound['ratio']:.3f}x eager's (target <= {MEMORY_TARGET})")


if __name__ == "__main__":
    main()
