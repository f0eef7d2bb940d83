"""The README's per-rank memory table of 13B and 70B models on several GPUs, from `fastunlearn plan`.

Runs the command itself (``python -m fastunlearn plan MODEL ... --json``) for each model, engine and
number of GPUs in the TOFU setting (batch 4 per GPU, 500 tokens, LoRA r=32, FILA + IHL, gradient
checkpointing), and prints a Markdown table: each cell is the predicted peak of live tensors on one
GPU, in GiB, and the phase where it happens. A plan, not a measurement (README "Several GPUs")::

    python benchmarks/plan_table.py
"""

from __future__ import annotations

import json
import subprocess
import sys

MODELS = ("llama2-13b", "llama2-70b")
ENGINES = ("zero3", "fsdp")
WORLD_SIZES = (2, 4, 8)
SETTING = [
    "--batch-size", "4", "--max-length", "500", "--rank", "32", "--init", "fila", "--method", "ihl",
    "--gradient-checkpointing",
]  # fmt: skip
GIB = 2**30


def plan(model: str, engine: str, world: int) -> tuple[float, str]:
    """Peak GiB per GPU and the phase where it happens, from the command's JSON output."""
    command = [sys.executable, "-m", "fastunlearn", "plan", model, *SETTING, "--json"]
    command += ["--engine", engine, "--world-size", str(world)]
    out = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    top = max(out["phases"], key=lambda p: p["peak_bytes"])
    return out["peak_bytes"] / GIB, top["name"]


def main() -> None:
    print(f"`fastunlearn plan MODEL {' '.join(SETTING)} --engine ENGINE --world-size N`\n")
    header = ["model", "engine", "1 GPU (no engine)", *(f"{n} GPUs" for n in WORLD_SIZES)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for model in MODELS:
        alone = plan(model, "none", 1)
        for engine in ENGINES:
            cells = [alone, *(plan(model, engine, n) for n in WORLD_SIZES)]
            print(
                f"| {model} | {engine} | " + " | ".join(f"{gib:.1f} ({phase})" for gib, phase in cells) + " |"
            )


if __name__ == "__main__":
    main()
