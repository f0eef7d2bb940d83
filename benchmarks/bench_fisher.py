"""Benchmark per-example squared gradients and Fisher estimation.

Part 1, ``per_example_grad_sq`` on one linear layer, ``Σ_n (G_nᵀ X_n)²`` for ``B`` examples of ``T``
tokens (FLOPs ``2·B·T·out·in``), compared in one run on the same inputs:
- ``triton``     the fused kernel (CUDA only): output tiles in registers, no ``[B, out, in]`` buffer
- ``torch``      the package's chunked PyTorch path (batched products over example chunks, bounded
                 buffer); it multiplies in fp32 whatever the inputs (TF32 tensor cores on CUDA)
- ``reference``  full materialisation: ``einsum`` into ``[B, out, in]``, square, sum
- ``vmap``       ``torch.func.vmap(torch.func.grad(·))`` per-sample gradients, then square and sum
The baselines run at the kernel's precision: with bf16/fp16 inputs ``reference`` and ``vmap`` multiply
in that dtype on the tensor cores, as the kernel does (then square and sum in fp32); with fp32 inputs
they multiply in fp32 with TF32 enabled on CUDA — faster than the kernel's IEEE fp32 products, so the
fp32 rows are conservative for the kernel. Peak memory is what the call allocates above its inputs.

Part 2, ``estimate_fisher`` (per-example mode) on a small Llama-architecture model built from a
config (random weights), one batch of ``B = 8`` sequences of ``T = 128`` tokens, against
- ``loop``  one forward/backward per example with weight gradients, squared and summed;
- ``vmap``  ``torch.func`` per-sample gradients of every target weight (``[B, out, in]`` each);
- ``plain_step``  one ordinary forward+backward of the batch with weight gradients — not a Fisher
  estimate but its floor: every method needs the forward, the backward to the layer outputs and one
  ``out×in×T`` product per example and layer, i.e. the FLOPs of a training step (``≈ 6·P·B·T``).
Methods are timed round-robin (see :func:`interleaved_medians`), in the model's dtype (bf16 on CUDA).
"Extra peak" is the peak above that of one plain forward+backward with weight gradients (which holds
the same activations and an fp32 gradient per weight, the size of the Fisher estimate itself), so it
is what each method costs beyond an ordinary gradient; it is compared with one ``[B, out, in]`` fp32
buffer of the largest target layer.

Memory: on CUDA the allocator's peak; on CPU the peak of live PyTorch tensor bytes, summed from the
profiler's allocation events (``_common.peak_tensor_bytes``; the resident-set high-water mark proved
too coarse).
CPU timings run on one thread by default: the machine is shared, and with 2 threads under load OpenMP
barriers cost whole scheduler slices (a 688×256 layer measured 556 ms with one-example chunks against
5 ms on one thread), which would distort every comparison.

Part 3 (``--memory``), activation memory of the Fisher pass against a LoRA training step
at the same batch (``B = 8``, ``T = 128``), on the ``peft``-wrapped model as ``unlearn`` measures it,
each the peak above the start (:func:`peak_bytes`):
- ``lora_step``: one forward and backward of the summed NLL through LoRA (r = 16, all linear layers
  but the head, dropout 0), in training mode, with and without ``transformers``' checkpointing (its
  peak includes the small LoRA gradients);
- ``fisher_pass``: one Fisher pass over every layer that folds nothing: the pass's activations alone;
- ``estimate_fisher`` (every layer in one group, with and without checkpointing; checkpointed in
  groups of one decoder layer) and ``fila_row_weights`` (checkpointed, groups of one decoder layer):
  the whole calls, accumulators included (created as the gradients arrive; on a CPU run the finished
  groups of ``estimate_fisher`` stay in the measured memory, being its result).

    python benchmarks/bench_fisher.py --preset cpu
    python benchmarks/bench_fisher.py --preset cpu --memory   # part 3 only
    python benchmarks/bench_fisher.py --preset gpu            # Llama-2-7B layer shapes, T up to 2048
    python benchmarks/bench_fisher.py --preset gpu --quick    # check + the target cases, meant for < 2 min
    python benchmarks/bench_fisher.py --preset gpu --check    # only the Triton-vs-fp64 correctness check
    python benchmarks/bench_fisher.py --preset dry            # toy sizes on CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
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
    median_time,
    peak_tensor_bytes,
    plot_bars,
    slug,
    write_results,
)
from _formulations import per_example_grad_sq_reference

from fastunlearn.fisher import estimate_fisher, select_linear_layers
from fastunlearn.ops.grad_sq import per_example_grad_sq

PRESETS = {
    "cpu": {
        # Llama-2-7B's attention and MLP shapes scaled down 8×.
        "layers": [(512, 512), (1376, 512)],
        "tokens": [32, 128],
        "dtypes": [torch.float32],
        "models": {
            "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "heads": 4},
            "small": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "heads": 8},
        },
        "repeats": 3,
    },
    "gpu": {
        "layers": [(4096, 4096), (11008, 4096)],
        "tokens": [128, 512, 2048],
        "dtypes": [torch.bfloat16],
        "extra_cases": [(4096, 4096, 512, torch.float32)],
        "models": {
            "small": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "heads": 8},
            "medium": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 4, "heads": 16},
        },
        "repeats": 5,
    },
    "dry": {
        "layers": [(48, 40)],
        "tokens": [16],
        "dtypes": [torch.float32, torch.bfloat16],
        "models": {"tiny": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "heads": 2}},
        "repeats": 2,
    },
}
BATCH = 8
MODEL_TOKENS = 128
VOCAB = 4096


# --------------------------------------------------------------------------------------------------
# Part 1: one layer
# --------------------------------------------------------------------------------------------------


def vmap_grad_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients with ``torch.func``: ``grad`` of ``⟨G_n, X_n Wᵀ⟩`` is ``G_nᵀ X_n``."""
    from torch.func import grad, vmap

    weight = torch.zeros(g.shape[-1], x.shape[-1], dtype=x.dtype, device=x.device)

    def inner(w: torch.Tensor, xn: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
        return (gn * (xn @ w.t())).sum()

    per_sample = vmap(grad(inner), in_dims=(None, 0, 0))(weight, x, g)  # [B, out, in]
    return per_sample.float().square().sum(0)


def reference_grad_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Full materialisation at the kernel's precision: products in the inputs' dtype when it is bf16 or
    fp16 (``einsum`` into ``[B, out, in]`` on the tensor cores), squared and summed in fp32; fp32
    inputs go through ``_formulations.per_example_grad_sq_reference`` (fp32 products)."""
    if x.dtype in (torch.bfloat16, torch.float16) and g.dtype == x.dtype:
        return torch.einsum("bto,bti->boi", g, x).float().square().sum(0)
    return per_example_grad_sq_reference(x, g)


def layer_methods(triton: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    methods: dict[str, Callable] = {
        "torch": lambda x, g: per_example_grad_sq(x, g, backend="torch"),
        "reference": reference_grad_sq,
        "vmap": vmap_grad_sq,
    }
    if triton:
        methods = {"triton": lambda x, g: per_example_grad_sq(x, g, backend="triton"), **methods}
    return methods


def bench_layer(out_f, in_f, T, dtype, device, repeats, log: ResultLog, triton: bool) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(BATCH, T, in_f, generator=gen, device=device).to(dtype)
    g = torch.randn(BATCH, T, out_f, generator=gen, device=device).to(dtype)
    flops = 2 * BATCH * T * out_f * in_f
    for name, fn in layer_methods(triton).items():
        row = {
            "part": "layer", "method": name, "out": out_f, "in": in_f, "B": BATCH, "T": T,
            "dtype": str(dtype).removeprefix("torch."),
            "per_example_buffer_bytes": BATCH * out_f * in_f * 4,
        }  # fmt: skip
        try:
            row["ms"] = median_time(lambda fn=fn: fn(x, g), device, repeats=repeats)
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            free_memory(device)
            row["peak_bytes"] = peak_tensor_bytes(lambda fn=fn: fn(x, g), device)
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        free_memory(device)
        log.add(row)
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """The device's measured dense matmul rate in TFLOP/s (``torch.mm``, ``n³``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_time(lambda: torch.mm(a, b), device, repeats=10, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------
# Part 2: a model
# --------------------------------------------------------------------------------------------------


def build_model(spec: dict, device: torch.device, dtype: torch.dtype, attention: str = "eager"):
    """The bench model; eager attention by default, the one torch.func can batch without a per-example
    fallback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"],
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def target_weights(model) -> dict[str, torch.nn.Parameter]:
    head = model.get_output_embeddings()
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[..., :-1, :].flatten(0, -2).float(),
        labels[..., 1:].flatten(),
        ignore_index=-100,
        reduction="sum",
    )


def fisher_loop(model, batch) -> dict[str, torch.Tensor]:
    """One forward/backward per example, weight gradients squared and summed: the obvious method."""
    weights = target_weights(model)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    try:
        for row in range(batch["input_ids"].shape[0]):
            logits = model(input_ids=batch["input_ids"][row : row + 1], use_cache=False).logits
            summed_nll(logits, batch["labels"][row : row + 1]).backward()
            for name, w in weights.items():
                sums[name].add_(w.grad.float().square())
                w.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    n = batch["input_ids"].shape[0]
    return {k: v / n for k, v in sums.items()}


def fisher_vmap(model, batch) -> dict[str, torch.Tensor]:
    """``torch.func`` per-sample gradients of every target weight, then squared and averaged."""
    from torch.func import functional_call, grad, vmap

    weights = {name + ".weight": w.detach() for name, w in target_weights(model).items()}

    def loss(params, ids, labels):
        logits = functional_call(model, params, (ids[None],), {"use_cache": False}).logits
        return summed_nll(logits, labels[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(weights, batch["input_ids"], batch["labels"])
    n = batch["input_ids"].shape[0]
    return {k.removesuffix(".weight"): v.float().square().sum(0) / n for k, v in per_sample.items()}


def plain_step(model, batch) -> None:
    """One forward+backward with weight gradients: the memory baseline."""
    weights = target_weights(model)
    for w in weights.values():
        w.requires_grad_(True)
    try:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        summed_nll(logits, batch["labels"]).backward()
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)


def bench_model(label, spec, device, dtype, repeats, log: ResultLog) -> None:
    model = build_model(spec, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, MODEL_TOKENS), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    largest = max(target_weights(model).values(), key=lambda w: w.numel())
    buffer = BATCH * largest.numel() * 4
    params = sum(w.numel() for w in target_weights(model).values())
    methods = {
        "fastunlearn": lambda: estimate_fisher(model, [batch], progress=False),
        "loop": lambda: fisher_loop(model, batch),
        "vmap": lambda: fisher_vmap(model, batch),
        "plain_step": lambda: plain_step(model, batch),  # not a Fisher: the floor of any of them
    }
    base_peak = peak_tensor_bytes(methods["plain_step"], device)
    free_memory(device)
    reference = fisher_loop(model, batch)
    rows, usable = [], {}
    for name, fn in methods.items():
        row = {
            "part": "model", "method": name, "model": label, "dtype": str(dtype).removeprefix("torch."),
            "B": BATCH, "T": MODEL_TOKENS, "target_params": params,
            "largest_layer": "x".join(map(str, largest.shape)), "per_example_buffer_bytes": buffer,
            "plain_step_peak_bytes": base_peak,
        }  # fmt: skip
        try:
            result = fn()
            if result is not None:
                row["max_rel_diff_vs_loop"] = max(
                    ((result[k].float() - reference[k]).abs().max() / reference[k].abs().max()).item()
                    for k in reference
                )
            del result
            free_memory(device)
            row["peak_bytes"] = peak_tensor_bytes(fn, device)
            row["extra_peak_bytes"] = row["peak_bytes"] - base_peak
            row["extra_peak_vs_buffer"] = row["extra_peak_bytes"] / buffer
            usable[name] = fn
        except (torch.OutOfMemoryError, RuntimeError) as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        free_memory(device)
        rows.append(row)
    for name, ms in interleaved_medians(usable, device, repeats).items():
        next(r for r in rows if r["method"] == name)["ms"] = ms
    for row in rows:  # the methods are timed together: their rows are complete only now
        log.add(row)
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


# --------------------------------------------------------------------------------------------------
# Part 3: activation memory of the Fisher pass against a LoRA step
# --------------------------------------------------------------------------------------------------

LORA_RANK = 16


def lora_model(spec: dict, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """The bench model wrapped with LoRA as ``unlearn`` wraps it, optionally with checkpointing."""
    from peft import LoraConfig, get_peft_model

    base = build_model(spec, device, dtype, attention="sdpa")
    if checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(base, config)


def lora_step(model, batch) -> None:
    """One training forward and backward (the optimiser's state is not an activation)."""
    model.train()
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    summed_nll(logits, batch["labels"]).backward()
    model.zero_grad(set_to_none=True)


def fisher_pass(model, batch) -> None:
    """One Fisher pass over every layer without folding: the pass's activations alone (the
    accumulators, created as the gradients arrive, are the budget's business)."""
    from fastunlearn.fisher.passes import fisher_session, prepare_batches, run_pass

    layers = select_linear_layers(model, None)
    with fisher_session(model, None):
        run_pass(model, prepare_batches([batch]), layers, mode="per_example", backend="auto", fold=False)


def bench_memory(label: str, spec: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from fastunlearn.fisher import fila_row_weights

    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, MODEL_TOKENS), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    per_block = 4 * sum(
        m.weight.numel()
        for n, m in build_model(spec, device, dtype).named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.0.")
    )
    # (method, checkpointing, accumulator budget) → the measured call
    cases = {
        ("lora_step", False, None): lambda m: lora_step(m, batch),
        ("lora_step", True, None): lambda m: lora_step(m, batch),
        ("fisher_pass", False, None): lambda m: fisher_pass(m, batch),
        ("fisher_pass", True, None): lambda m: fisher_pass(m, batch),
        ("estimate_fisher", False, None): lambda m: estimate_fisher(m, [batch], progress=False),
        ("estimate_fisher", True, None): lambda m: estimate_fisher(m, [batch], progress=False),
        ("estimate_fisher", True, per_block): lambda m: estimate_fisher(
            m, [batch], max_memory=per_block, progress=False
        ),
        ("fila_row_weights", True, 2 * per_block): lambda m: fila_row_weights(
            m, [batch], [batch], max_memory=2 * per_block, progress=False
        ),
    }
    rows = []
    for (method, checkpointing, budget), fn in cases.items():
        model = lora_model(spec, device, dtype, checkpointing)
        fn(model)  # warm-up: lazily created state is not the step's
        free_memory(device)
        row = {
            "part": "memory", "method": method, "model": label, "dtype": str(dtype).removeprefix("torch."),
            "B": BATCH, "T": MODEL_TOKENS, "checkpointing": checkpointing,
            "accumulator_budget_bytes": budget,
            "target_params": sum(m.weight.numel() for m in select_linear_layers(model, None).values()),
            "peak_bytes": peak_tensor_bytes(lambda fn=fn, model=model: fn(model), device),
        }  # fmt: skip
        rows.append(row)
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del model
        free_memory(device)
    return rows


def summarise_memory(rows: list[dict]) -> list[str]:
    """Per model: the Fisher pass's activations against the LoRA step's peak, and the whole calls' peaks."""
    mib = 2.0**-20
    lines = []
    for label in dict.fromkeys(r["model"] for r in rows if r["part"] == "memory"):
        by = {
            (r["method"], r["checkpointing"], r["accumulator_budget_bytes"]): r
            for r in rows
            if r["part"] == "memory" and r["model"] == label
        }
        lora = {ckpt: by[("lora_step", ckpt, None)]["peak_bytes"] for ckpt in (False, True)}
        fisher = {ckpt: by[("fisher_pass", ckpt, None)]["peak_bytes"] for ckpt in (False, True)}
        text = f"{label} model, B={BATCH}, T={MODEL_TOKENS}: Fisher pass activations vs LoRA step peak: "
        text += "; ".join(
            f"{name} {fisher[ckpt] * mib:.1f} vs {lora[ckpt] * mib:.1f} MiB "
            f"({fisher[ckpt] / lora[ckpt]:.2f}x)"
            for ckpt, name in ((False, "plain"), (True, "checkpointed"))
        )
        accumulators = 4 * next(iter(by.values()))["target_params"]
        calls = [
            f"{method} ({'checkpointed' if ckpt else 'plain'}"
            + (f", budget {budget * mib:.2f} MiB" if budget else "")
            + f") {r['peak_bytes'] * mib:.1f} MiB"
            for (method, ckpt, budget), r in by.items()
            if method in ("estimate_fisher", "fila_row_weights")
        ]
        text += f". Whole calls (fp32 accumulators of every layer: {accumulators * mib:.1f} MiB): "
        text += "; ".join(calls)
        lines.append(text)
    return lines


# --------------------------------------------------------------------------------------------------
# GPU correctness check of the Triton kernel
# --------------------------------------------------------------------------------------------------


CHECK_CASES = {  # (B, T, in, out, dtype, accumulate)
    "gpu": [
        (3, 19, 45, 37, torch.float32, False),
        (1, 300, 130, 257, torch.float32, True),
        (8, 512, 1000, 700, torch.bfloat16, False),
        (4, 77, 4096, 4096, torch.bfloat16, True),
        (2, 1000, 333, 129, torch.float16, False),
        (5, 64, 256, 256, torch.bfloat16, False),
    ],
    "dry": [(3, 19, 45, 37, torch.float32, False), (2, 17, 40, 33, torch.bfloat16, True)],
}


def check_triton(device: torch.device, cases: str = "gpu") -> list[str]:
    """The Triton kernel against an fp64 ``einsum`` on ``device``, with the tests' per-element bound
    ``|got − want| ≤ 2·(2·T·u·Σ_n (|G_n|ᵀ|X_n|)² + u·|want|)``, ``u = 2⁻²⁴``. Returns failures.
    ``cases="dry"``: two small cases, for CPU tensors under the Triton interpreter."""
    u = 2.0**-24
    failures = []
    for B, T, n_in, n_out, dtype, accumulate in CHECK_CASES[cases]:
        gen = torch.Generator(device=device).manual_seed(B * T)
        x = torch.randn(B, T, n_in, generator=gen, device=device).to(dtype)
        g = torch.randn(B, T, n_out, generator=gen, device=device).to(dtype)
        base = torch.rand(n_out, n_in, generator=gen, device=device) if accumulate else None
        got = per_example_grad_sq(x, g, base.clone() if accumulate else None, backend="triton")
        want = torch.einsum("bto,bti->boi", g.double(), x.double()).square().sum(0)
        scale = torch.einsum("bto,bti->boi", g.double().abs(), x.double().abs()).square().sum(0)
        if accumulate:
            want, scale = want + base.double(), scale + base.double()
        ratio = (
            ((got.double() - want).abs() / (2 * (2 * T * u * scale + u * want.abs()) + 1e-30)).max().item()
        )
        status = "ok" if ratio <= 1.0 else "FAIL"
        line = (
            f"triton check B={B} T={T} {n_out}x{n_in} {dtype} accumulate={accumulate}: "
            f"{ratio:.3f} of the bound {status}"
        )
        print(line, flush=True)
        if ratio > 1.0:
            failures.append(line)
    return failures


def gpu_check(dry_run: bool = False) -> bool:
    """Entry point for ``benchmarks/gpu_check.py``: the Triton kernel on the current CUDA device, or
    (``dry_run``) small cases on CPU tensors under the Triton interpreter."""
    if dry_run:
        return not check_triton(torch.device("cpu"), "dry")
    return not check_triton(torch.device("cuda"))


# --------------------------------------------------------------------------------------------------


def summarise(rows: list[dict], device: torch.device, rate: float | None) -> list[str]:
    """The issue's target ratios, each computed from this run's rows."""
    lines = []
    fused = "triton" if device.type == "cuda" else "torch"
    if rate:
        lines.append(f"device bf16 matmul rate (torch.mm 8192^3): {rate:.0f} TFLOP/s")
    layer_cases = dict.fromkeys((r["out"], r["in"], r["T"], r["dtype"]) for r in rows if r["part"] == "layer")
    for case in layer_cases:
        by = {
            r["method"]: r
            for r in rows
            if r["part"] == "layer" and (r["out"], r["in"], r["T"], r["dtype"]) == case and "error" not in r
        }
        if fused not in by:
            continue
        ours = by[fused]
        text = (
            f"{case[0]}x{case[1]} B={BATCH} T={case[2]} {case[3]}: {fused} {ours['ms']:.2f} ms, "
            f"{ours['tflops']:.2f} TFLOP/s"
        )
        if rate and case[3] == "bfloat16":
            text += f" ({ours['tflops'] / rate:.0%} of matmul)"
        for other in ("torch", "reference", "vmap"):
            if other != fused and other in by:
                label = "torch (fp32 products)" if other == "torch" and case[3] != "float32" else other
                text += f"; {by[other]['ms'] / ours['ms']:.2f}x faster than {label}"
        peak, buffer = ours["peak_bytes"] * 2**-20, ours["per_example_buffer_bytes"] * 2**-20
        text += f"; peak {peak:.1f} MiB vs [B,out,in] {buffer:.1f} MiB"
        lines.append(text)
    for label in dict.fromkeys(r["model"] for r in rows if r["part"] == "model"):
        by = {
            r["method"]: r for r in rows if r["part"] == "model" and r["model"] == label and "error" not in r
        }
        if "fastunlearn" not in by:
            continue
        ours = by["fastunlearn"]
        text = (
            f"estimate_fisher, {label} model ({ours['target_params'] / 1e6:.1f}M measured weights, "
            f"B={BATCH}, T={MODEL_TOKENS}): {ours['ms']:.0f} ms"
        )
        for other in ("loop", "vmap", "plain_step"):
            if other in by:
                text += f"; {by[other]['ms'] / ours['ms']:.2f}x faster than {other}"
        extra, buffer = ours["extra_peak_bytes"] * 2**-20, ours["per_example_buffer_bytes"] * 2**-20
        text += (
            f"; extra peak {extra:.1f} MiB = {ours['extra_peak_vs_buffer']:.2f}x one [B,out,in] buffer of "
            f"{ours['largest_layer']} ({buffer:.1f} MiB)"
        )
        if "vmap" in by:
            text += f"; vmap extra peak {by['vmap']['extra_peak_vs_buffer']:.2f}x"
        lines.append(text)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    layer = [r for r in rows if r["part"] == "layer" and "ms" in r]
    plot_bars(
        layer,
        path,
        case=lambda r: (r["out"], r["in"], r["T"], r["dtype"]),
        case_label=lambda c: f"{c[0]}x{c[1]} T={c[2]} {c[3]}",
        series="method",
        panels=[("ms", 1.0, "time (ms, median)"), ("peak_bytes", 2.0**-20, "peak memory (MiB)")],
        log_x=True,
        title=f"per_example_grad_sq, B={BATCH}",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the preset; exit status 1 if the Triton correctness check failed."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--repeats", type=int, help="timed repeats per case (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; see the docstring)")
    parser.add_argument("--check", action="store_true", help="only run the Triton correctness check (GPU)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the GPU check and the target cases only (T <= 512, first model): meant to fit in 2 min",
    )
    parser.add_argument("--skip-models", action="store_true", help="only the single-layer benchmark")
    parser.add_argument(
        "--memory", action="store_true", help="only part 3: Fisher-pass activations against a LoRA step"
    )
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    dry = args.preset == "dry"
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    repeats = args.repeats or preset["repeats"]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(device)
    env["threads"] = torch.get_num_threads()
    failures: list[str] = []
    if device.type == "cuda" or dry:
        failures = check_triton(device, "dry" if dry else "gpu")
        env["triton_check"] = failures or "passed"
        if args.check:
            return 1 if failures else 0
    elif args.check:
        parser.error("--check needs the gpu or dry preset")
    if device.type == "cuda":
        # fp32 baselines multiply on the tensor cores (TF32), as a user would let them; set after the
        # check, whose fp64 reference must not be affected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env["tf32"] = device.type == "cuda"

    if args.memory:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = []
        for label, spec in preset["models"].items():
            rows += bench_memory(label, spec, device, dtype)
        env["summary"] = summarise_memory(rows)
        env["threads"] = torch.get_num_threads()
        write_results(f"fisher_memory_{slug(device)}", rows, env)
        for line in env["summary"]:
            print(line)
        return 0

    stem = f"fisher_{slug(device)}" + ("_quick" if args.quick else "") + ("_dry" if dry else "")
    log = ResultLog(stem, env)
    tokens = [t for t in preset["tokens"] if t <= 512] if args.quick else preset["tokens"]
    cases = [(o, i, t, d) for d in preset["dtypes"] for o, i in preset["layers"] for t in tokens]
    if not args.quick:
        cases += preset.get("extra_cases", [])
    models = dict(list(preset["models"].items())[:1]) if args.quick else preset["models"]
    for out_f, in_f, T, dtype in cases:
        bench_layer(out_f, in_f, T, dtype, device, repeats, log, triton=device.type == "cuda" or dry)
    rate = matmul_rate(device, torch.bfloat16) if device.type == "cuda" else None
    if not args.skip_models:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for label, spec in models.items():
            bench_model(label, spec, device, dtype, repeats, log)
            free_memory(device)
    summary = summarise(log.rows, device, rate)
    log.finish(summary=summary)
    plot(log.rows, RESULTS_DIR / f"{stem}.png")
    for line in summary:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
