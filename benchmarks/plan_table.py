"""The README's memory-plan tables, from `fastunlearn plan` itself.

Runs the command (``python -m fastunlearn plan MODEL ... --json``) in the TOFU setting (batch 4, 500
tokens, LoRA r = 32, FILA + IHL, bf16 on a GPU, Fisher budget 4 GiB), with and without gradient
checkpointing, and prints a Markdown table of each phase's peak (GB of live tensors) and the phase
that decides; with ``--world-sizes``, the per-GPU peak under ZeRO-3 and FSDP as well. It also records
how long each plan took. A plan, not a measurement (README "Memory plan")::

    python benchmarks/plan_table.py [--models llama2-7b llama3-8b] [--world-sizes 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SETTING = ["--batch-size", "4", "--max-length", "500", "--rank", "32", "--init", "fila", "--method", "ihl"]
SETTING += ["--fisher-memory", "4GiB"]
PHASES = ("load", "evaluate", "fisher", "fila", "train_step", "save")


def plan(model: str, *flags: str) -> tuple[dict, float]:
    """The plan's JSON and the seconds the command took."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "fastunlearn", "plan", model, *SETTING, *flags, "--json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama2-7b", "llama3-8b"])
    parser.add_argument("--world-sizes", type=int, nargs="*", default=[])
    args = parser.parse_args()
    print(f"`fastunlearn plan MODEL {' '.join(SETTING)} [--gradient-checkpointing]`\n")
    print("| model | checkpointing | " + " | ".join(PHASES) + " | peak | seconds |")
    print("|---|---|" + "---|" * (len(PHASES) + 2))
    for model in args.models:
        for flags in ((), ("--gradient-checkpointing",)):
            data, seconds = plan(model, *flags)
            peaks = {p["name"]: p["peak_bytes"] / 1e9 for p in data["phases"]}
            cells = [f"{peaks[name]:.2f}" if name in peaks else "" for name in PHASES]
            on = "on" if flags else "off"
            peak = f"{data['peak_bytes'] / 1e9:.2f} ({data['peak_phase']})"
            print(f"| {model} | {on} | " + " | ".join(cells) + f" | {peak} | {seconds:.0f} |")
    if not args.world_sizes:
        return
    print("\nPer GPU (GB), with checkpointing:\n")
    print("| model | engine | " + " | ".join(f"{n} GPUs" for n in args.world_sizes) + " |")
    print("|---|---|" + "---|" * len(args.world_sizes))
    for model in args.models:
        for engine in ("zero3", "fsdp"):
            cells = []
            for n in args.world_sizes:
                data, _ = plan(model, "--gradient-checkpointing", "--engine", engine, "--world-size", str(n))
                cells.append(f"{data['peak_bytes'] / 1e9:.2f} ({data['peak_phase']})")
            print(f"| {model} | {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
