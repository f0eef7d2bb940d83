"""DeepSpeed ZeRO-3 ``fastunlearn unlearn`` on CUDA GPUs, checked against runs without DeepSpeed.

What the CPU test suite cannot run (tests/test_deepspeed.py): ``transformers.Trainer`` under DeepSpeed
on several processes needs a GPU backend (on the CPU accelerator accelerate reports one process and
the data is not sharded). On the tiny demo's data and memorising model (no download), in fp32:

- ``zero3 ×W`` — ``torchrun --nproc_per_node W ... --deepspeed zero3.json --merge`` (the model created
  partitioned; Fisher, FILA, training and both exports under ZeRO-3);
- ``ddp ×W`` — the same command without ``--deepspeed`` (W > 1 only);
- ``one`` — one process with the same global batch (``W × --batch-size``).

Checks (relative distance of the adapters' and the merged weights' tensors, in norm):
``zero3 ×W`` vs ``ddp ×W`` ≤ 1e-4 — the same maths (each rank's token mean, gradients averaged), fp32
rounding in another order through a few Adam steps; ``zero3 ×1`` vs ``one`` ≤ 1e-4 likewise; for
W > 1, ``zero3 ×W`` vs ``one`` ≤ 0.05, as tests/test_distributed.py (per-rank token means vs one mean
over all tokens). NCCL cannot run two ranks on one GPU, so W = min(2, GPUs): on a one-GPU machine
only the single-process ZeRO-3 path is checked, which the results say.

Writes ``results/gpu_deepspeed_<device tag>.json`` (and ``.csv``), including the reason when it
skips (no DeepSpeed, no CUDA). Exits non-zero when a check fails or a run fails.

    python benchmarks/gpu_deepspeed.py                # from benchmarks/gpu_run.sh
    python benchmarks/gpu_deepspeed.py --try-on-cpu   # this script on a CPU: ZeRO-3 ×1 vs one process
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import ResultLog, environment, slug

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2  # per process
TRY_ON_CPU = "--try-on-cpu" in sys.argv
TOL_SAME_MATHS = 1e-4
TOL_GLOBAL_MEAN = 0.05


def _workspace(root: Path) -> dict[str, str]:
    """The tiny demo's data and memorising model (:func:`fastunlearn.demo.prepare_models`), built in
    ``root``."""
    from fastunlearn import demo

    return demo.prepare_models(str(root), demo.SIZES["tiny"], seed=0, progress=False)


def _run(ws: dict[str, str], out: Path, processes: int, batch: int, *extra: str) -> float:
    from fastunlearn.demo import DEMO_TEMPLATE

    args = [
        "unlearn", ws["full_model"], "--forget", ws["forget"], "--retain", ws["retain"],
        "--output", str(out), "--template", DEMO_TEMPLATE, "--epochs", "2",
        "--batch-size", str(batch), "--grad-accum", "1", "--rank", "4", "--alpha", "8", "--init", "fila",
        "--fisher-batch-size", "2", "--no-progress", "--lr", "1e-3", "--precision", "fp32", "--merge", *extra,
    ]  # fmt: skip
    # --standalone: torchrun's own rendezvous on a free local port (none picked beforehand to race for)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
    ]
    command = [*launcher, "-m", "fastunlearn", *args]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def _distance(a: Path, b: Path) -> float:
    """max over the adapter and the merged model of ‖a − b‖ / ‖b‖ over all their tensors."""
    from safetensors.torch import load_file

    worst = 0.0
    for part, name in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        x, y = load_file(a / part / name), load_file(b / part / name)
        if x.keys() != y.keys():
            raise RuntimeError(f"{a / part} and {b / part} hold different tensors")
        diff = sum(float((x[k].double() - y[k].double()).norm() ** 2) for k in y) ** 0.5
        size = sum(float(y[k].double().norm() ** 2) for k in y) ** 0.5
        worst = max(worst, diff / size)
    return worst


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = ResultLog(f"gpu_deepspeed_{slug(device)}", environment(device))
    skip = None
    if importlib.util.find_spec("deepspeed") is None:
        skip = 'DeepSpeed is not installed (pip install -e ".[deepspeed]")'
    elif device.type != "cuda" and not TRY_ON_CPU:
        skip = "no CUDA device: DeepSpeed through Trainer on several processes needs GPUs"
    if skip is not None:
        print(f"gpu_deepspeed: skipped: {skip}")
        log.finish(skipped=skip)
        return 0
    import deepspeed

    world = max(1, min(2, torch.cuda.device_count()))
    if TRY_ON_CPU:
        os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by the runs
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ws = _workspace(root)
        config = root / "zero3.json"
        config.write_text(json.dumps({
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3},
        }))  # fmt: skip
        runs = {"zero3": (world, BATCH, "--deepspeed", str(config)), "one": (1, world * BATCH)}
        if world > 1:
            runs["ddp"] = (world, BATCH)
        seconds = {}
        for name, (processes, batch, *extra) in runs.items():
            seconds[name] = _run(ws, root / name, processes, batch, *extra)
            print(f"gpu_deepspeed: {name} ×{processes}: {seconds[name]:.1f} s")
        if world > 1:
            checks = [("zero3", "ddp", TOL_SAME_MATHS), ("zero3", "one", TOL_GLOBAL_MEAN)]
        else:
            checks = [("zero3", "one", TOL_SAME_MATHS)]
        for a, b, tol in checks:
            distance = _distance(root / a, root / b)
            ok = distance <= tol
            failed |= not ok
            row = {"processes": world, "compare": f"{a} vs {b}", "relative_distance": distance,
                   "tolerance": tol, "ok": ok, f"{a}_s": seconds[a], f"{b}_s": seconds[b]}  # fmt: skip
            print(f"gpu_deepspeed: {row}")
            log.add(row)
    note = None if world > 1 else "one GPU: NCCL cannot run 2 ranks on one device; only ZeRO-3 ×1 checked"
    log.finish(deepspeed=deepspeed.__version__, gpus=torch.cuda.device_count(), note=note, failed=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
