"""Benchmark extraction likelihood EL_10: batched (shared prefixes) against the naive per-prefix loop.

The workload of the extraction protocol (Jang et al. 2023): 32 sequences of 200 tokens, EL_10,
on a small Llama-architecture model built from a config. Three regimes, all measured in this run:

- ``memorised``: the model is first trained on the 32 sequences until it reproduces them (MA ≥ 0.99:
  the forget set before unlearning);
- ``partial``: trained until MA ≥ 0.5 (a forget set part-way through unlearning);
- ``unmemorised``: the same architecture at random initialisation (the worst case for sharing:
  nearly every prefix diverges from the text, so only batching helps).

``naive`` is the original algorithm: one greedy decode per prefix length t (batched over the 32
sequences, KV cache), scored with a per-example Python loop. ``batched`` is
``fastunlearn.metrics.extraction_likelihood(method="batched")``. Both run once (the naive loop takes
minutes on a CPU); the results must be identical. The machine is shared, so CPU timings carry other
processes' load; the ratio of the two, measured back to back, is the number to read.

    python benchmarks/bench_extraction.py            # ~3 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import environment, peak_memory, write_results

from fastunlearn.evaluation.metrics import extraction_likelihood, memorization_accuracy


def build_model(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg)


def train_steps(model, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> None:
    """Full-batch optimiser steps of next-token NLL on the sequences."""
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def timed(fn):
    """Run ``fn`` once: (result, seconds, peak bytes above the start)."""
    box = {}

    def run():
        start = time.perf_counter()
        box["out"] = fn()
        box["s"] = time.perf_counter() - start

    peak = peak_memory(run, torch.device("cpu"))
    return box["out"], box["s"], peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256, help="rows per batched decode (library default 64)")
    p.add_argument("--train-steps", type=int, default=300, help="most training steps per regime")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared machine: 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.sequences, args.length), generator=g)
    rows = []
    for regime, target_ma in (("memorised", 0.99), ("partial", 0.5), ("unmemorised", 0.0)):
        model = build_model(args.vocab, args.seed)
        start = time.perf_counter()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        ma, steps = memorization_accuracy(model, ids).mean().item(), 0
        while ma < target_ma and steps < args.train_steps:
            train_steps(model, opt, ids, 5)
            steps += 5
            ma = memorization_accuracy(model, ids).mean().item()
        train_s = time.perf_counter() - start
        el_b, t_b, mem_b = timed(
            lambda m=model: extraction_likelihood(m, ids, n=args.n, batch_size=args.batch_size)
        )
        el_n, t_n, mem_n = timed(
            lambda m=model: extraction_likelihood(m, ids, n=args.n, method="naive", batch_size=args.sequences)
        )
        diff = (el_b - el_n).abs().max().item()
        row = {
            "regime": regime,
            "sequences": args.sequences,
            "length": args.length,
            "n": args.n,
            "model": f"Llama h=128 L=2 V={args.vocab}",
            "train_steps": steps,
            "train_s": round(train_s, 2),
            "mean_ma": ma,
            "mean_el": el_b.mean().item(),
            "naive_s": t_n,
            "batched_s": t_b,
            "speedup": t_n / t_b,
            "naive_peak_mb": mem_n / 2**20,
            "batched_peak_mb": mem_b / 2**20,
            "batched_rows_per_decode": args.batch_size,
            "max_abs_diff": diff,
            "identical": bool(torch.equal(el_b, el_n)),
        }
        rows.append(row)
        print(
            f"{regime:<12} MA {ma:.3f}  EL_{args.n} {row['mean_el']:.4f}  naive {t_n:7.1f} s  "
            f"batched {t_b:6.2f} s  speedup {row['speedup']:6.1f}x  max|diff| {diff:.1e}  "
            f"peak MB naive {row['naive_peak_mb']:.0f} batched {row['batched_peak_mb']:.0f}",
            flush=True,
        )
    env = environment(torch.device("cpu"))
    env["note"] = "shared 2-core machine: other processes' load affects absolute times"
    csv_path, _ = write_results("extraction_cpu", rows, env)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
