"""Benchmark the loss of one unlearning step from the last hidden states.

The paper's objective ``IHL(forget) + NLL(retain)`` on ``N`` tokens (``N/2`` forget, ``N/2`` retain)
with hidden size ``H`` and vocabulary ``V``, forward and backward, through one output head ``W``
(frozen, as under LoRA: the gradient goes to the hidden states; ``--train-head`` adds ``∂W``):

- ``eager``   ``z = h @ Wᵀ`` per term, ``ihl_loss(z_f) + F.cross_entropy(z_r.float())`` — the logits
  path as ``fastunlearn.methods`` computed it before the objectives moved into the patched model
  (an fp32 copy of bf16 retain logits, a log-softmax);
- ``logits``  ``z = h @ Wᵀ`` per term, ``ihl_loss(z_f) + nll_loss(z_r)`` — the logits path of
  ``fastunlearn.patch(model, fused=False)``: both terms on the row kernels, bf16 stays bf16;
- ``fused``   ``fused_linear_ihl_loss(h_f, W) + fused_linear_nll_loss(h_r, W)`` — the patched model's
  path: chunks of logits only.

Time: the median of ``--repeats`` forward+backward steps, the paths timed round-robin after a warm-up
round (``_common.interleaved_medians``). Peak memory: what a step allocates above its inputs — on
CUDA the caching allocator's peak, on CPU the peak of live PyTorch tensor bytes summed from the
profiler's allocation events (``_common.peak_tensor_bytes``: exact for tensors, allocator-independent,
without BLAS scratch space). "One logits buffer" is ``N·V`` elements in the step's dtype.
CPU timings run on one thread by default: on the shared 2-core machine, 2 threads under load made
every small per-block op wait on OpenMP barriers (a first try at N=1024 measured the fused step at
3.6x eager with 2 threads and 0.88x with 1), which distorts the comparison (see bench_fisher.py).

Targets: fused extra peak ≤ 0.25× the eager path's and time ≤ 1.3× it; in bf16 the logits
path's extra peak ≤ 2.0× one bf16 logits buffer.

On a GPU the same run also compares the cross-entropy (NLL) alone on all ``N`` tokens of the case, from
the hidden states, with the other fused-linear implementations (imported only then; each skipped with a
note when it is not installed): ``nll_fused`` (:func:`fastunlearn.fused_linear_nll_loss`), ``nll_eager``
(``F.cross_entropy`` of fp32 logits), ``liger_flce`` (Liger-Kernel's fused linear cross-entropy,
``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``) and ``cce`` (Apple's Cut
Cross-Entropy, ``cut_cross_entropy.linear_cross_entropy`` with its defaults, gradient filtering
included). Their rows have ``objective = "nll"``; the JSON records each one's loss relative to
``nll_fused``'s. The dry preset runs this comparison on the CPU with the package's paths only.

    python benchmarks/bench_loss.py --preset cpu     # N=4096, H=2048, V=32000, fp32 and bf16
    python benchmarks/bench_loss.py --preset gpu     # N=8192, H=4096, V=128256, bf16
    python benchmarks/bench_loss.py --preset dry     # toy sizes on CPU (gpu_run.sh's dry run)
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

from fastunlearn import fused_linear_ihl_loss, fused_linear_nll_loss, ihl_loss, nll_loss

PRESETS = {
    "cpu": {"cases": [(4096, 2048, 32000, torch.float32), (4096, 2048, 32000, torch.bfloat16)], "repeats": 3},
    "gpu": {"cases": [(8192, 4096, 128256, torch.bfloat16)], "repeats": 5},
    # gpu_run.sh's dry run: this script's code path at toy sizes on the CPU.
    "dry": {"cases": [(64, 32, 1001, torch.float32), (48, 32, 3001, torch.bfloat16)], "repeats": 1},
}
TARGETS = {"fused_peak_vs_eager": 0.25, "fused_time_vs_eager": 1.3, "bf16_logits_peak_vs_buffer": 2.0}


def eager(h_f, h_r, w, y_f, y_r):
    retain = F.cross_entropy((h_r @ w.t()).float(), y_r, ignore_index=-100)
    return ihl_loss(h_f @ w.t(), y_f, validate=False) + retain


def logits(h_f, h_r, w, y_f, y_r):
    return ihl_loss(h_f @ w.t(), y_f, validate=False) + nll_loss(h_r @ w.t(), y_r, validate=False)


def fused(h_f, h_r, w, y_f, y_r):
    return fused_linear_ihl_loss(h_f, w, y_f, validate=False) + fused_linear_nll_loss(
        h_r, w, y_r, validate=False
    )


PATHS: dict[str, Callable] = {"eager": eager, "logits": logits, "fused": fused}


def ce_paths(device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    """The NLL-alone paths ``fn(h [N, H], w, y [N])``: the package's, and on CUDA the other libraries'
    that are installed; notes say which were skipped and why."""
    paths: dict[str, Callable] = {
        "nll_fused": lambda h, w, y: fused_linear_nll_loss(h, w, y, validate=False),
        "nll_eager": lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100),
    }
    if device.type != "cuda":
        return paths, {"liger_flce, cce": "CUDA only: not run"}
    notes = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        paths["liger_flce"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, ignore_index=-100)
    except ImportError as err:
        notes["liger_flce"] = f"liger-kernel not importable ({err})"
    try:
        from cut_cross_entropy import linear_cross_entropy

        paths["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100)
    except ImportError as err:
        notes["cce"] = f"cut-cross-entropy not importable ({err})"
    return paths, notes


def inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, train_head: bool):
    """Hidden states and a head giving logits of standard deviation ~3; 10 % of the labels ignored."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    half = n // 2
    h = torch.randn(2, half, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * (3 / hidden**0.5)).to(device, dtype)
    y = torch.randint(0, vocab, (2, half), generator=gen)
    y[torch.rand(2, half, generator=gen) < 0.1] = -100
    h_f, h_r = (t.requires_grad_() for t in h.unbind(0))
    return h_f, h_r, w.requires_grad_(train_head), *y.to(device).unbind(0)


def timed_steps(paths: dict[str, Callable], args: tuple, leaves: list) -> dict[str, Callable[[], None]]:
    def step(path: Callable) -> Callable[[], None]:
        def run() -> None:
            path(*args).backward()
            for leaf in leaves:
                leaf.grad = None

        return run

    return {name: step(path) for name, path in paths.items()}


def measure(
    steps: dict[str, Callable[[], None]], device, repeats: int, buffer: int, case: dict
) -> list[dict]:
    """A row per path: its extra peak (after a warm-up call) and median time; a path that fails is a
    row with its error."""
    rows, working = [], {}
    for name, run in steps.items():
        try:
            run()  # warm-up: one-time allocations (BLAS, Triton compilation) stay out of the peak
            free_memory(device)
            peak = peak_tensor_bytes(run, device)
        except Exception as err:  # another library's path that cannot run here is reported, not fatal
            rows.append({**case, "path": name, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            continue
        working[name] = run
        rows.append({**case, "path": name, "peak_bytes": peak, "logits_buffer_bytes": buffer,
                     "peak_vs_logits_buffer": peak / buffer})  # fmt: skip
        print(f"  {name}: peak {peak / 2**20:.0f} MiB = {peak / buffer:.2f}x one logits buffer", flush=True)
    medians = interleaved_medians(working, device, repeats)
    for row in rows:
        if row["path"] in medians:
            row["fwd_bwd_ms"] = medians[row["path"]]
    return rows


def bench_case(
    n, hidden, vocab, dtype, device, repeats, train_head, log: ResultLog, compare_ce: bool
) -> None:
    args = inputs(n, hidden, vocab, dtype, device, train_head)
    leaves = [a for a in args if a.requires_grad]
    buffer = n * vocab * torch.finfo(dtype).bits // 8
    case = {"n": n, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
            "head": "trained" if train_head else "frozen"}  # fmt: skip
    for row in measure(
        timed_steps(PATHS, args, leaves), device, repeats, buffer, {**case, "objective": "ihl+nll"}
    ):
        log.add(row)
    if not compare_ce:
        return
    h_f, h_r, w, y_f, y_r = args
    h = torch.cat([h_f.detach(), h_r.detach()]).requires_grad_()
    y = torch.cat([y_f, y_r])
    paths, notes = ce_paths(device)
    log.env.setdefault("notes", {}).update(notes)
    ce_leaves = [t for t in (h, w) if t.requires_grad]
    for row in measure(
        timed_steps(paths, (h, w, y), ce_leaves), device, repeats, buffer, {**case, "objective": "nll"}
    ):
        log.add(row)
    with torch.no_grad():
        ours = float(paths["nll_fused"](h, w, y))
        agreement = {
            name: abs(float(fn(h, w, y)) - ours) / ours for name, fn in paths.items() if name != "nll_fused"
        }
    log.env.setdefault("nll_rel_diff_vs_fused", {})[str(tuple(case.values()))] = agreement


def summarise(rows: list[dict]) -> list[str]:
    """Each target against this run's rows."""
    lines = []
    main_rows = [r for r in rows if r["objective"] == "ihl+nll" and "fwd_bwd_ms" in r]
    for case in dict.fromkeys((r["n"], r["hidden"], r["vocab"], r["dtype"], r["head"]) for r in main_rows):
        by = {
            r["path"]: r
            for r in main_rows
            if (r["n"], r["hidden"], r["vocab"], r["dtype"], r["head"]) == case
        }
        eager_row, logits_row, fused_row = by["eager"], by["logits"], by["fused"]
        peak = fused_row["peak_bytes"] / eager_row["peak_bytes"]
        time = fused_row["fwd_bwd_ms"] / eager_row["fwd_bwd_ms"]
        text = (
            f"N={case[0]} H={case[1]} V={case[2]} {case[3]} ({case[4]} head): "
            f"fused {fused_row['fwd_bwd_ms']:.0f} ms = {time:.2f}x eager "
            f"(target <= {TARGETS['fused_time_vs_eager']}), "
            f"{logits_row['fwd_bwd_ms'] / eager_row['fwd_bwd_ms']:.2f}x for the logits path; "
            f"fused extra peak {fused_row['peak_bytes'] / 2**20:.0f} MiB = {peak:.3f}x eager's "
            f"(target <= {TARGETS['fused_peak_vs_eager']}); "
            f"peak / one logits buffer: eager {eager_row['peak_vs_logits_buffer']:.2f}, logits "
            f"{logits_row['peak_vs_logits_buffer']:.2f}, fused {fused_row['peak_vs_logits_buffer']:.3f}"
        )
        if case[3] == "bfloat16":
            text += f" (bf16 logits-path target <= {TARGETS['bf16_logits_peak_vs_buffer']})"
        lines.append(text)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    plot_bars(
        [r for r in rows if "fwd_bwd_ms" in r],
        path,
        case=lambda r: (r["n"], r["hidden"], r["vocab"], r["dtype"], r["head"], r["objective"]),
        case_label=lambda c: f"N={c[0]} H={c[1]} V={c[2]}\n{c[3]}, {c[4]} head, {c[5]}",
        series="path",
        panels=[("fwd_bwd_ms", 1.0, "forward+backward (ms, median)"),
                ("peak_vs_logits_buffer", 1.0, "extra peak (x one logits buffer)")],
        title="IHL(forget) + NLL(retain) from hidden states",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, help="timed steps per path (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, see the module doc)")
    parser.add_argument("--train-head", action="store_true", help="the head is trained: also form dW")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    env = environment(device)
    env["memory"] = (
        "CUDA allocator peak" if device.type == "cuda" else "peak of live PyTorch tensor bytes (profiler)"
    )
    stem = f"loss_{slug(device)}" + ("_train_head" if args.train_head else "")
    stem += "_dry" if args.preset == "dry" else ""
    log = ResultLog(stem, env)  # rows are written as they are measured
    compare_ce = device.type == "cuda" or args.preset == "dry"
    for n, hidden, vocab, dtype in preset["cases"]:
        print(f"N={n} H={hidden} V={vocab} {dtype}", flush=True)
        repeats = args.repeats or preset["repeats"]
        bench_case(n, hidden, vocab, dtype, device, repeats, args.train_head, log, compare_ce)
        free_memory(device)
    summary = summarise(log.rows)
    log.finish(summary=summary)
    plot(log.rows, RESULTS_DIR / f"{stem}.png")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
