"""The whole job on the GPU, end to end: what no CPU test can run there.

Run by ``benchmarks/gpu_run.sh`` after the kernel checks and the benchmarks. On the tiny demo (its
data, tokenizer, memorising and retain-only models built in a temporary cache; no download):

1. ``fastunlearn demo --size tiny``'s job (:func:`fastunlearn.demo.run_demo`): IHL + FILA through
   ``Trainer`` on the device at the run's precision (bf16 on Ampere and later), evaluated every epoch,
   then scored with the TOFU protocol (greedy generation, truth ratios, forget quality);
2. ``unlearn`` stopped by a rule that holds within a few steps (forget probability ≤ 0.9 and forget
   ROUGE-L ≤ 0.999, evaluated every 2 steps, ``patience=2``, ``restore="best"``, generation at every
   evaluation): the evaluations during training, a state kept and possibly put back.

Checks: every metric finite; the demo forgets selectively (forget probability kept ≤ 0.5× of what the
retain set keeps, the test suite's CPU bound); the stopped run records its trajectory and a kept
step; its outputs exist. Writes ``results/gpu_smoke_<device tag>.{json,csv}`` (seconds, peak device
memory) and exits non-zero on a failed check. ``--dry-run``: the same on the CPU.

    python benchmarks/gpu_smoke.py            # on a CUDA machine
    python benchmarks/gpu_smoke.py --dry-run  # this script on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import ResultLog, environment, slug

RULE = "forget.prob<=0.9,forget.rougeL<=0.999"


def _finite(tree, where: str) -> list[str]:
    """The paths of the non-finite numbers in a nested dict of metrics."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _finite(v, f"{where}.{k}")]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [where]
    return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="on the CPU")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device (--dry-run runs this script on the CPU)")
        return 1
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cpu" if args.dry_run else "cuda")
    from fastunlearn import demo, unlearn
    from fastunlearn.demo import run_demo, unlearn_options

    log = ResultLog(f"gpu_smoke_{slug(device)}", environment(device))
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fastunlearn-gpu-smoke-") as root:
        cache, spec = Path(root) / "cache", demo.SIZES["tiny"]
        start = time.perf_counter()
        paths = demo.prepare_models(str(cache), spec, seed=0, progress=False)
        log.add({"step": "demo models", "seconds": round(time.perf_counter() - start, 2)})

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = run_demo(str(Path(root) / "demo"), size="tiny", cache_dir=str(cache), progress=False,
                          log=lambda *a: None)  # fmt: skip
        m = result.metrics
        kept = {s: m["after"][s]["prob"] / m["before"][s]["prob"] for s in ("forget", "retain")}
        failures += _finite(m, "demo")
        if not kept["forget"] <= 0.5 * kept["retain"]:
            failures.append(f"demo: forget kept {kept['forget']:.3f}x, retain {kept['retain']:.3f}x")
        log.add({
            "step": "demo (IHL + FILA, TOFU protocol)", "seconds": round(time.perf_counter() - start, 2),
            "forget_prob_kept": kept["forget"], "retain_prob_kept": kept["retain"],
            "forget_quality": m["after"]["tofu"]["forget_quality"],
            "peak_device_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        })  # fmt: skip

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = Path(root) / "stop"
        stopped = unlearn(paths["full_model"], None, paths["forget"], paths["retain"], output_dir=out,
                          **{**unlearn_options(spec, seed=0), "progress": False, "eval_every": 2},
                          stop=RULE, patience=2, restore="best", generate_within=1.0)  # fmt: skip
        s = stopped.metrics["stopping"]
        failures += _finite(stopped.metrics, "stop")
        rows = (out / "trajectory.csv").read_text().splitlines() if (out / "trajectory.csv").is_file() else []
        if len(rows) < 3 or s["first_satisfied_step"] is None or s["stopped_step"] is None:
            failures.append(f"stop: trajectory of {len(rows) - 1} evaluations, summary {s}")
        if not (out / "adapter" / "adapter_model.safetensors").is_file():
            failures.append("stop: no adapter written")
        log.add({
            "step": f"unlearn --stop-when {RULE} --patience 2 --restore best", "seconds":
            round(time.perf_counter() - start, 2), "first_satisfied_step": s["first_satisfied_step"],
            "kept_step": s["kept_step"], "restored": s["restored"], "eval_s": s["eval_s"],
            "train_s": s["train_s"],
            "peak_device_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        })  # fmt: skip
    log.finish(failures=failures)
    print(json.dumps({"failures": failures, "rows": log.rows}, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
