"""Scale check of the memory plan (issue 12, part 5): a Llama-2-7B-wide model with K decoder layers.

Builds ``LlamaForCausalLM`` from Llama-2-7B's config with ``num_hidden_layers = K`` (full width: hidden
4096, intermediate 11008, vocabulary 32000), on the meta device and then materialised with random bf16
weights, wraps it with LoRA (the trainer's recipe: r, alpha = 2r, dropout 0, all linear layers), and
runs the phases of a FILA + IHL run one after the other, as :func:`fastunlearn.unlearn` does:

    fisher_forget, fisher_retain   fastunlearn.estimate_fisher (today's all-layers estimator)
    fila                           fastunlearn.fila_init
    train_step                     N steps of training.methods.method_loss under bf16 autocast (per
                                   model call, as accelerate applies it) with
                                   gradient checkpointing, gradient clipping and AdamW (the Trainer's)
    save                           fastunlearn.save_adapter

For each phase it records the wall time and the peak memory above what was live when the phase
started — on CUDA the allocator's peak; on CPU the peak of live tensor bytes from the profiler's
allocation events (the resident set, ``VmHWM``, is recorded too, for reference: it includes allocator
caching and library buffers). The same window of :func:`fastunlearn.memory_plan.plan_memory` (the
phase's peak minus its resident terms, which are exact parameter counts) is reported next to it, and
the per-layer figures — ``(peak(K₂) − peak(K₁)) / (K₂ − K₁)`` between consecutive K and between the
extremes, measured and planned — are what the issue's 15 % target is about: the embedding and head
are the same at every K. (A difference of peaks is a per-layer figure only while the peak stays at
the same moment of the phase.)

Each K runs in its own subprocess, so one K's allocations cannot inflate another's.

    python benchmarks/bench_scale.py                          # CPU: K = 1, 2, 4 at 2×128 tokens
    python benchmarks/bench_scale.py --device cuda --max-length 512 --batch 4 --fila-solver svd
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, peak_tensor_bytes, slug, write_results

from fastunlearn.memory_plan import KNOWN_MODELS, plan_memory

RESIDENT = {
    "fisher_forget": ("weights", "LoRA parameters (fp32)"),
    "fisher_retain": ("weights", "LoRA parameters (fp32)"),
    "fila": ("weights", "LoRA parameters (fp32)"),
    "train_step": ("weights", "LoRA parameters (fp32)", "LoRA gradients (fp32)", "AdamW moments (fp32)"),
    "save": ("weights", "LoRA parameters (fp32)", "AdamW moments (fp32)"),
}


def config(layers: int) -> dict[str, Any]:
    return {**KNOWN_MODELS["llama2-7b"], "num_hidden_layers": layers, "max_position_embeddings": 4096}


def build_model(layers: int, device: torch.device, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in config(layers).items() if k != "model_type"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    # Materialise: storage for every tensor in bf16, random weights, unit norms, RoPE recomputed
    # (to_empty leaves buffers uninitialised too).
    model = model.to_empty(device=device).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        rope = model.model.rotary_emb
        inv_freq, _ = rope.compute_default_rope_parameters(rope.config)
        rope.inv_freq = inv_freq.to(device)
        rope.original_inv_freq = inv_freq.to(device)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, lora)


def batches(count: int, batch: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, KNOWN_MODELS["llama2-7b"]["vocab_size"], (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, -length // 4 :] = 0  # padded, as TOFU batches are
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : length // 4] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def measure(fn, device: torch.device) -> tuple[float, int, int]:
    """(seconds, peak tensor bytes above the start, peak RSS above the start or -1 on CUDA)."""
    if device.type == "cuda":
        start = time.perf_counter()
        peak = peak_tensor_bytes(fn, device)
        return time.perf_counter() - start, peak, -1
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    rss_before = _status("VmRSS:")
    start = time.perf_counter()
    peak = peak_tensor_bytes(fn, device)
    return time.perf_counter() - start, peak, _status("VmHWM:") - rss_before


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """All phases for one K, in this process."""
    import fastunlearn
    from fastunlearn.training.methods import method_loss

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args.layers, device, args.rank)
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}
    forget = [to_device(b) for b in batches(args.fisher_batches, args.batch, args.max_length, 1)]
    retain = [to_device(b) for b in batches(args.fisher_batches, args.batch, args.max_length, 2)]
    results: dict[str, Any] = {}
    estimates: dict[str, Any] = {}

    def fisher(name, data):
        def fn():
            estimates[name] = fastunlearn.estimate_fisher(model, data, progress=False)

        return fn

    for name, data in (("forget", forget), ("retain", retain)):
        results[f"fisher_{name}"] = measure(fisher(name, data), device)
        estimates[name] = estimates[name].to("cpu")  # as the trainer does between the two
    results["fila"] = measure(
        lambda: fastunlearn.fila_init(
            model, estimates["forget"], estimates["retain"], solver=args.fila_solver
        ),
        device,
    )
    estimates.clear()  # the estimates are saved by the trainer; here they are no longer needed
    # The trainer's gradient checkpointing (fastunlearn.training.run), then the Trainer's step.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    # --fused (the default, as unlearn's): every loss term at the output head; --no-fused: from the logits.
    fastunlearn.patch(model, fused=bool(args.fused_linear))
    # Trainer's bf16: accelerate autocasts each call of the model on its own (not one region around
    # the forget and the retain forward), which decides where the retain gradients wait (memory_plan).
    model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    pair = {"forget": forget[0], "retain": retain[0]}

    def step():
        loss, _ = method_loss(model, pair, "ihl")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # Gradients stay allocated (zeroed), as between the micro-batches of gradient accumulation.
        optimizer.zero_grad(set_to_none=False)

    step()  # optimizer moments and gradients exist from here on

    def steps():
        for _ in range(args.steps):
            step()

    seconds, peak, rss = measure(steps, device)
    results["train_step"] = (seconds / args.steps, peak, rss)
    out_dir = Path(args.scratch) / f"adapter_K{args.layers}"
    results["save"] = measure(lambda: fastunlearn.save_adapter(model, out_dir, overwrite=True), device)
    return {k: {"seconds": v[0], "peak_bytes": v[1], "rss_bytes": v[2]} for k, v in results.items()}


def planned(args: argparse.Namespace, layers: int) -> dict[str, int]:
    plan = plan_memory(
        config(layers),
        batch_size=args.batch,
        max_length=args.max_length,
        rank=args.rank,
        gradient_checkpointing=True,
        fused_linear=args.fused_linear,
        fisher="all_layers",
        fisher_batch_size=args.batch,
        fila_solver=args.fila_solver,
        device=args.device.split(":")[0],
    )
    out = {}
    for phase, resident in RESIDENT.items():
        moments = plan.phase(phase).moments
        out[phase] = max(sum(b for n, b in t.items() if n not in resident) for t in moments.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--fisher-batches", type=int, default=2)
    parser.add_argument(
        "--fila-solver", default="truncated", help="truncated, svd, randomized (fila_init's solvers)"
    )
    parser.add_argument(
        "--fused",
        dest="fused_linear",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every loss term fused at the output head, unlearn's default; --no-fused: the logits path",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", default="/tmp/fastunlearn_bench_scale")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.one:
        (args.layers,) = args.layers
        print(json.dumps(run_one(args)))
        return
    measured: dict[int, dict[str, Any]] = {}
    for K in args.layers:
        cmd = [sys.executable, __file__, "--one", "--layers", str(K)]
        for key in (
            "device",
            "batch",
            "max_length",
            "rank",
            "steps",
            "fisher_batches",
            "fila_solver",
            "threads",
        ):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--scratch", args.scratch, "--fused" if args.fused_linear else "--no-fused"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"K={K} failed:\n{done.stderr[-4000:]}")
        measured[K] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"K={K}", measured[K], flush=True)
    rows = []
    for K in args.layers:
        plan = planned(args, K)
        for phase, m in measured[K].items():
            rows.append(
                {
                    "layers": K,
                    "phase": phase,
                    "seconds": round(m["seconds"], 2),
                    "measured_bytes": m["peak_bytes"],
                    "planned_bytes": plan[phase],
                    "ratio": round(m["peak_bytes"] / plan[phase], 3),
                    "rss_bytes": m["rss_bytes"],
                }
            )
    # Per-layer figures between consecutive K and between the extremes.
    ks = sorted(args.layers)
    pairs = list(itertools.pairwise(ks)) + ([(ks[0], ks[-1])] if len(ks) > 2 else [])
    for lo, hi in pairs:
        plan_lo, plan_hi = planned(args, lo), planned(args, hi)
        for phase in measured[lo]:
            per_layer = (measured[hi][phase]["peak_bytes"] - measured[lo][phase]["peak_bytes"]) / (hi - lo)
            per_layer_plan = (plan_hi[phase] - plan_lo[phase]) / (hi - lo)
            rows.append(
                {
                    "layers": f"per layer ({lo}→{hi})",
                    "phase": phase,
                    "measured_bytes": round(per_layer),
                    "planned_bytes": round(per_layer_plan),
                    "ratio": round(per_layer / per_layer_plan, 3) if per_layer_plan else None,
                }
            )
    for row in rows:
        print(row)
    device = torch.device(args.device)
    env = environment(device)
    env["settings"] = {k: v for k, v in vars(args).items() if k != "one"}
    env["load_average_1_5_15min"] = os.getloadavg()
    env["memory"] = "CUDA allocator peak" if device.type == "cuda" else "profiler live-tensor peak (CPU)"
    write_results(f"scale_{slug(device)}", rows, env)


if __name__ == "__main__":
    main()
