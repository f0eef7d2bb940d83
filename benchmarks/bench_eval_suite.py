"""Batched membership inference and MUSE generation against one sequence per call, on the demo's model.

Two evaluations of the field, each timed against the way it is usually written:

- ``mia``: the four attacks' scores (LOSS, ZLib, Min-K%, Min-K%++) of ``--texts`` raw texts.
  ``batched B``: :func:`fastunlearn.evaluation.mia.membership_scores`, one forward per padded batch of
  ``B`` sequences (each ``B`` of ``--batches``) with ``(log p_y, μ, σ)`` computed at the output head.
  ``per-sequence``: one forward per sequence, its ``[T, V]`` logits, ``log_softmax``, ``μ`` and ``σ``
  from the full distribution and the scores in PyTorch (the shape of MUSE's and Min-K%++'s code).
  ``per-sequence (fused)``: ``membership_scores`` with batches of 1. ``forward only B``: the model's
  forward over padded batches of ``B`` (in file order), nothing computed from its logits — the floor
  of any batched scoring on the same model.
- ``muse``: greedy KnowMem answers (MUSE's prompt: in-context examples, then the question; 32 new
  tokens, stop at EOS) of ``--prompts`` questions. ``batched B``:
  :func:`fastunlearn.evaluation.decoding.greedy_texts`, left-padded batches of ``B`` with a KV
  cache. ``per-item``: one ``model.generate`` call per prompt (greedy, KV cache, stop at EOS).

Both methods of a task give the same numbers (checked here before timing: scores to 1e-4, texts
exactly). Methods are timed round-robin (``_common.interleaved_medians``), ``--repeats`` rounds after a
warm-up; medians are reported with their speed-up over the per-item baseline. On CPU the tiny model's
per-call overhead is what batching removes, so the speed-up grows with the batch until the batch's
own compute dominates.

    python benchmarks/bench_eval_suite.py               # a few minutes on one CPU core
    python benchmarks/bench_eval_suite.py --threads 2   # both cores

The demo's data and models are built on first use (``fastunlearn.demo``; cached). Writes
``benchmarks/results/eval_suite_<device>[_<N>threads].{csv,json}`` with the machine's load average
before and after (the 1-minute ``os.getloadavg``): on a shared machine the other processes' load moves
every number, the per-item baselines' most.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings

import torch
from _common import ResultLog, environment, interleaved_medians, slug

from fastunlearn.evaluation.decoding import greedy_texts
from fastunlearn.evaluation.mia import membership_scores
from fastunlearn.evaluation.muse import knowmem_prompt


def per_sequence_scores(model, tokenizer, texts, *, k: float, max_length: int) -> dict[str, list[float]]:
    """The attacks' scores one sequence per forward, from the full softmax (the usual code)."""
    import zlib

    out = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": []}
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]])
            log_p = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            token_lp = log_p.gather(-1, ids[0, 1:, None]).squeeze(-1)
            p = log_p.exp()
            mu = (p * log_p).sum(-1)
            sigma = ((p * log_p.square()).sum(-1) - mu.square()).clamp_min(1e-6).sqrt()
            count = max(1, math.floor(k * len(token_lp)))
            loss = -token_lp.mean().item()
            out["loss"].append(loss)
            out["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
            out["min_k"].append(-token_lp.sort().values[:count].mean().item())
            out["min_k_plus_plus"].append(-((token_lp - mu) / sigma).sort().values[:count].mean().item())
    return out


def forward_only(model, tokenizer, texts, *, batch_size: int, max_length: int) -> None:
    """The model's forward over padded batches, logits and nothing else: the floor of batched scoring."""
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            )  # fmt: skip
            model(**batch, use_cache=False)


def generate_one_by_one(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


def demo_model_and_texts(cache_dir: str | None):
    from fastunlearn import demo
    from fastunlearn.data.records import read_records
    from fastunlearn.models.loading import load_model_and_tokenizer

    paths = demo.prepare_models(cache_dir or demo.default_cache_dir(), demo.SIZES["small"], progress=False)
    model, tokenizer = load_model_and_tokenizer(paths["full_model"], paths["tokenizer"])
    records = read_records(paths["retain"], ("question", "answer")) + read_records(
        paths["forget"], ("question", "answer")
    )
    return model.eval(), tokenizer, records


def check_mia(batched: dict, naive: dict) -> None:
    for key, values in naive.items():
        err = (batched[key] - torch.tensor(values, dtype=torch.float64)).abs().max().item()
        if err > 1e-4:
            raise SystemExit(f"the two MIA implementations disagree on {key}: {err}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=128, help="sequences scored by the MIA task")
    p.add_argument("--prompts", type=int, default=64, help="KnowMem questions answered by the MUSE task")
    p.add_argument("--batches", default="16,32,64,128", help="batch sizes of the batched methods")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    p.add_argument("--cache-dir", default=None, help="demo cache directory")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    model, tok, records = demo_model_and_texts(args.cache_dir)
    device = torch.device("cpu")
    threads = "" if args.threads == 1 else f"_{args.threads}threads"
    load = os.getloadavg()[0]  # a shared machine: the other processes' load is part of the measurement
    log = ResultLog(f"eval_suite_{slug(device)}{threads}", {**environment(device), "load_before": load})

    qa = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in records]
    texts = (qa * math.ceil(args.texts / len(qa)))[: args.texts]
    opts = {"k": 0.4, "max_length": 128}
    check_mia(membership_scores(model, tok, texts[:16], batch_size=8, **opts),
              per_sequence_scores(model, tok, texts[:16], **opts))  # fmt: skip
    mia = {"per-sequence": lambda: per_sequence_scores(model, tok, texts, **opts)}
    mia["per-sequence (fused)"] = lambda: membership_scores(model, tok, texts, batch_size=1, **opts)
    for b in batches:
        mia[f"batched {b}"] = lambda b=b: membership_scores(model, tok, texts, batch_size=b, **opts)
        mia[f"forward only {b}"] = lambda b=b: forward_only(model, tok, texts, batch_size=b, max_length=128)

    prompts = [knowmem_prompt(records[:3], r["question"]) for r in records[3 : 3 + args.prompts]]
    answers = generate_one_by_one(model, tok, prompts, 32)
    if greedy_texts(model, tok, prompts, max_new_tokens=32, batch_size=8) != answers:
        raise SystemExit("batched and one-by-one greedy answers differ")
    muse = {"per-item": lambda: generate_one_by_one(model, tok, prompts, 32)}
    for b in batches:
        muse[f"batched {b}"] = lambda b=b: greedy_texts(model, tok, prompts, max_new_tokens=32, batch_size=b)

    for task, fns, base, items in (("mia", mia, "per-sequence", texts), ("muse", muse, "per-item", prompts)):
        times = interleaved_medians(fns, device, args.repeats)
        for method, ms in times.items():
            row = {"task": task, "method": method, "items": len(items), "median_ms": ms, "baseline": base}
            print(log.add({**row, "speedup": times[base] / ms}))
    log.finish(
        threads=args.threads, repeats=args.repeats, model="demo small (fastunlearn.demo)",
        load_after=os.getloadavg()[0],
    )  # fmt: skip


if __name__ == "__main__":
    main()
