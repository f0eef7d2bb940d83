"""The memory plan against the run, phase by phase, at Llama-2-7B width with K decoder layers.

For each K, a Llama-2-7B config (hidden 4096, intermediate 11008, vocabulary 32000) with
``num_hidden_layers = K`` is planned (:func:`fastunlearn.plan.plan.plan_memory`: the run's phases on
fake tensors) and the same phases run on real tensors on the device
(:func:`fastunlearn.plan.phases.measure_phases`: on CUDA the allocator's peak, on CPU the profiler's
live tensor bytes), with random bf16 weights: load, the evaluation before and after training, the
Fisher passes of the planned groups under ``--fisher-memory``, FILA, a training step in the steady
state (AdamW's moments and the earlier micro-batches' gradients there), the export. A row per phase:
planned and measured peak bytes and their ratio.

On a GPU the run takes the Triton kernels while the plan takes the PyTorch paths of the loss terms
(planned as the kernels: outputs only) and of the Fisher fold (whose per-example gradient chunk the
Triton kernel does not need: the plan over-predicts the Fisher phase by up to two fp32 copies of the
largest layer).

Each K is measured in its own process, while this one plans it (``--memory-limit``, CUDA only, caps
the measuring process with ``torch.cuda.set_per_process_memory_fraction`` before anything is
allocated); a K that runs out of memory is recorded as such and the bench goes on. Results:
``scale_<device>.{csv,json}``.

    python benchmarks/bench_scale.py --layers 1 2                          # CPU, 2×128 tokens
    python benchmarks/bench_scale.py --device cuda --layers 32 --batch 4 --max-length 512 \
        --memory-limit 24GiB --fisher-memory 4GiB --gradient-checkpointing  # gpu_run.sh's step
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ResultLog, environment, slug

from fastunlearn.fisher.budget import parse_bytes
from fastunlearn.options.unlearn import UnlearnConfig
from fastunlearn.plan.phases import Setting, measure_phases
from fastunlearn.plan.plan import KNOWN_MODELS, model_config, plan_memory


def run_config(args: argparse.Namespace) -> UnlearnConfig:
    return UnlearnConfig(
        batch_size=args.batch,
        fisher_batch_size=args.batch,
        eval_batch_size=args.batch,
        lora_r=args.rank,
        fisher_memory=args.fisher_memory,
        fila_solver=args.fila_solver,
        gradient_checkpointing=args.gradient_checkpointing,
        fused=args.fused,
    )


def config(layers: int) -> Any:
    return model_config({**KNOWN_MODELS["llama2-7b"], "num_hidden_layers": layers})


def run_one(args: argparse.Namespace) -> None:
    """Measure every phase for one K in this process; one JSON record on stdout."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.memory_limit is not None:  # before anything is allocated on the device
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit / total), device)
    torch.manual_seed(0)
    setting = Setting(
        config(args.layers[0]), args.max_length, args.precision, device=device, target=device.type
    )
    try:
        record = {"result": "ok", "measured": measure_phases(run_config(args), setting)}
    except torch.OutOfMemoryError as err:
        record = {"result": "oom", "error": str(err).splitlines()[0][:300]}
    print(json.dumps(record), flush=True)


def start_measuring(args: argparse.Namespace, layers: int) -> subprocess.Popen:
    """:func:`run_one` for ``layers`` in a process of its own, started now (the plan is made meanwhile)."""
    cmd = [sys.executable, __file__, "--one", "--layers", str(layers)]
    for key in ("device", "batch", "max_length", "rank", "fila_solver", "threads", "precision"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key in ("fisher_memory", "memory_limit"):
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    cmd += [] if args.fused is None else ["--fused" if args.fused else "--no-fused"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measured(child: subprocess.Popen, layers: int) -> dict[str, Any]:
    out, err = child.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode or not lines:
        raise SystemExit(f"K={layers} failed:\n{err[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="K (default 1 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--fisher-memory", type=parse_bytes, default=None, help="e.g. 4GiB (default: one layer)"
    )
    parser.add_argument("--memory-limit", type=parse_bytes, default=None, help="CUDA only: the process's cap")
    parser.add_argument("--fila-solver", default="truncated", choices=("truncated", "svd", "randomized"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory_limit is not None and device.type != "cuda":
        parser.error("--memory-limit caps CUDA memory (set_per_process_memory_fraction)")
    if args.one:
        run_one(args)
        return
    env = environment(device)
    env["settings"] = {k: v for k, v in vars(args).items() if k != "one"}
    log = ResultLog(f"scale_{slug(device)}", env)
    for layers in args.layers:
        child = start_measuring(args, layers)
        plan = plan_memory(
            run_config(args),
            config=config(layers),
            tokens=args.max_length,
            device=device.type,
            precision=args.precision,
        )
        run = measured(child, layers)
        for phase in plan.phases:
            row = {
                "layers": layers,
                "phase": phase.name,
                "step": phase.step,
                "planned_bytes": phase.peak_bytes,
            }
            if run["result"] == "ok":
                got = run["measured"][phase.name]
                row.update(measured_bytes=got, ratio=round(got / phase.peak_bytes, 4))
            else:
                row.update(result="oom", error=run["error"])
            print(log.add(row), flush=True)
    log.finish(load_average_1_5_15min=os.getloadavg())


if __name__ == "__main__":
    main()
