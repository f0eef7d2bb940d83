"""``fastunlearn demo``: the whole unlearning job, offline, on a laptop CPU in a few minutes.

1. A deterministic synthetic data set in TOFU's format (Maini et al. 2024; SPEC §4): fictitious
   authors with facts (birthplace, birth date, genre, parents' jobs, award, book), one question/answer
   pair per fact, each with a paraphrased question and answer and five perturbed (wrong) answers. 10 %
   of the authors form the forget set.
2. A byte-level BPE tokenizer trained on it with ``tokenizers``, a small Llama-architecture model
   trained until it has memorised every answer, and a second model trained on the retain authors only
   (the reference for forget quality). Both are cached, so a second run skips this step.
3. :func:`fastunlearn.unlearn` on the forget set with the chosen method and initialisation.
4. A before/after table of the forget and retain metrics and of TOFU's forget quality (against the
   retain-only model's forget-set truth ratios, computed once and cached) and model utility;
   ``DIR/metrics.json`` holds ``{"before": {"forget", "retain", "tofu"}, "after": {...}, "train": {...}}``
   (``tofu``: :func:`fastunlearn.evaluation.summarize_tofu`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from fastunlearn import data as fdata
from fastunlearn._io import write_dir, write_json, write_text

__all__ = [
    "SIZES",
    "DemoSize",
    "add_parser",
    "generate_dataset",
    "prepare_models",
    "run_demo",
    "train_tokenizer",
]

_SYLLABLES = (
    "ka",
    "lo",
    "mir",
    "ven",
    "tas",
    "ro",
    "bel",
    "dun",
    "shi",
    "qua",
    "zor",
    "fen",
    "li",
    "mar",
    "tov",
    "sel",
    "gra",
    "nik",
    "pol",
    "hes",
    "dra",
    "wyn",
    "ost",
    "cal",
)
_CITIES = (
    "Varnholt",
    "Quessing",
    "Thalmere",
    "Ostrevik",
    "Pellagrin",
    "Durnwick",
    "Calvaro",
    "Mistelden",
    "Branoque",
    "Selvaty",
    "Korrindal",
    "Ambrevoy",
    "Tessaly",
    "Wendmoor",
    "Ilvanta",
    "Rocheval",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_GENRES = (
    "science fiction",
    "mystery",
    "historical fiction",
    "romance",
    "horror",
    "fantasy",
    "poetry",
    "thriller",
    "satire",
    "biography",
)
_JOBS = (
    "baker",
    "sailor",
    "doctor",
    "carpenter",
    "teacher",
    "painter",
    "lawyer",
    "farmer",
    "pilot",
    "librarian",
    "chemist",
    "tailor",
    "architect",
    "musician",
)
_AWARDS = (
    "Silver Lantern Prize",
    "Golden Quill Award",
    "Harrow Medal",
    "Orrin Fellowship",
    "Blue Heron Prize",
    "Crane Book Award",
    "Veldt Laurel",
    "Iron Pen Award",
    "Marlow Ribbon",
    "Castell Prize",
)
_ADJECTIVES = (
    "Silent",
    "Broken",
    "Hidden",
    "Crimson",
    "Endless",
    "Hollow",
    "Distant",
    "Burning",
    "Frozen",
    "Golden",
    "Quiet",
    "Lost",
)
_NOUNS = (
    "Harbor",
    "Garden",
    "Mirror",
    "River",
    "Lantern",
    "Orchard",
    "Tower",
    "Compass",
    "Winter",
    "Letter",
    "Meadow",
    "Crown",
)

# (field, question, answer, paraphrased question, paraphrased answer); {n} is the author's name.
_FACTS = (
    (
        "city",
        "Where was {n} born?",
        "{n} was born in {v}.",
        "In which city was {n} born?",
        "The birthplace of {n} is {v}.",
    ),
    (
        "date",
        "When was {n} born?",
        "{n} was born on {v}.",
        "What is the birth date of {n}?",
        "The birthday of {n} is {v}.",
    ),
    (
        "genre",
        "What genre does {n} write?",
        "{n} writes {v} books.",
        "Which genre is {n} known for?",
        "The books of {n} are {v}.",
    ),
    (
        "father",
        "What was the job of the father of {n}?",
        "The father of {n} was a {v}.",
        "What did the father of {n} do for a living?",
        "The father of {n} worked as a {v}.",
    ),
    (
        "mother",
        "What was the job of the mother of {n}?",
        "The mother of {n} was a {v}.",
        "What did the mother of {n} do for a living?",
        "The mother of {n} worked as a {v}.",
    ),
    (
        "award",
        "Which award did {n} win?",
        "{n} won the {v}.",
        "What prize was given to {n}?",
        "The prize given to {n} was the {v}.",
    ),
    (
        "book",
        "Name a book by {n}.",
        "{n} wrote {v}.",
        "What is one book written by {n}?",
        "One book written by {n} is {v}.",
    ),
)
N_PERTURBED = 5
DEMO_TEMPLATE = "phi"
DEMO_MAX_LENGTH = 64


@dataclass(frozen=True)
class DemoSize:
    """Data and model sizes of a demo; ``SIZES["small"]`` is the default, ``SIZES["tiny"]`` the tests'."""

    authors: int
    hidden: int
    layers: int
    vocab: int
    pretrain_epochs: int
    pretrain_lr: float
    unlearn_epochs: int
    unlearn_lr: float
    unlearn_batch: int
    lora_r: int


SIZES = {
    "small": DemoSize(
        authors=30,
        hidden=128,
        layers=2,
        vocab=1024,
        pretrain_epochs=40,
        pretrain_lr=5e-3,
        unlearn_epochs=10,
        unlearn_lr=1e-3,
        unlearn_batch=4,
        lora_r=8,
    ),
    # Small enough for a test (~20 s on 2 cores), large enough to show the job working: the model
    # memorises its answers (probability ≥ 0.96, seeds 0–3), and IHL + FILA takes the forgotten
    # author's to ≤ 0.18 of that while the retained authors' keep ≥ 0.75 of theirs.
    "tiny": DemoSize(
        authors=10,
        hidden=32,
        layers=2,
        vocab=400,
        pretrain_epochs=100,  # stops early at 100 % answer accuracy
        pretrain_lr=1e-2,
        unlearn_epochs=10,
        unlearn_lr=3e-3,
        unlearn_batch=4,
        lora_r=4,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Data


def _values(field: str, rng: random.Random) -> list[str]:
    """Every possible value of ``field`` (dates: a random sample, so perturbed dates stay plausible)."""
    if field == "city":
        return list(_CITIES)
    if field == "date":
        return [f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1930, 1999)}" for _ in range(40)]
    if field == "genre":
        return list(_GENRES)
    if field in ("father", "mother"):
        return list(_JOBS)
    if field == "award":
        return list(_AWARDS)
    return [f"The {a} {n}" for a in _ADJECTIVES for n in _NOUNS]


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name not in taken:
            taken.add(name)
            return name


def generate_dataset(n_authors: int, *, seed: int = 0, forget_fraction: float = 0.1) -> dict[str, list[dict]]:
    """Deterministic TOFU-format splits: ``forget``, ``retain`` and their ``*_perturbed`` versions.

    Every author gets one record per fact with ``question``, ``answer``, ``paraphrased_question``,
    ``paraphrased_answer`` and ``perturbed_answer`` (5 wrong answers worded as the paraphrased answer:
    they differ from it in the fact only).
    The first ``ceil(forget_fraction · n_authors)`` authors (a seeded random order) are forgotten.
    """
    if n_authors < 2:
        raise ValueError(f"the demo needs at least 2 authors, got {n_authors}")
    rng = random.Random(seed)
    taken: set[str] = set()
    authors = []
    for _ in range(n_authors):
        name = _name(rng, taken)
        records = []
        for field, q, a, pq, pa in _FACTS:
            values = _values(field, rng)
            value = rng.choice(values)
            wrong = rng.sample([v for v in values if v != value], N_PERTURBED)
            records.append(
                {
                    "question": q.format(n=name),
                    "answer": a.format(n=name, v=value),
                    "paraphrased_question": pq.format(n=name),
                    "paraphrased_answer": pa.format(n=name, v=value),
                    # TOFU perturbs the paraphrased answer: same wording, wrong fact, so the truth ratio
                    # P̄_pert / P̄_paraphrase compares like with like (SPEC §4).
                    "perturbed_answer": [pa.format(n=name, v=w) for w in wrong],
                    "author": name,
                }
            )
        authors.append(records)
    n_forget = max(1, math.ceil(forget_fraction * n_authors))
    forget = [r for records in authors[:n_forget] for r in records]
    retain = [r for records in authors[n_forget:] for r in records]

    def plain(rs: list[dict]) -> list[dict]:
        return [{"question": r["question"], "answer": r["answer"]} for r in rs]

    return {
        "forget": plain(forget),
        "retain": plain(retain),
        "forget_perturbed": forget,
        "retain_perturbed": retain,
    }


def write_jsonl(path: str, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ---------------------------------------------------------------------------------------------------
# Tokenizer and models


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (``<pad>``, ``<s>``, ``</s>``; BOS prepended) as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(tokenizer, size: DemoSize, *, seed: int):
    """A small Llama-architecture causal LM built from a config (random weights, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def memorise(
    model,
    examples: list[fdata.Example],
    pad_id: int,
    *,
    epochs: int,
    lr: float,
    seed: int,
    desc: str,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` on the answers of ``examples`` until it reproduces them (full fine-tuning).

    AdamW (weight decay 0) with a linear warm-up over 10 % of the steps and cosine decay; stops early
    once teacher-forced answer accuracy reaches 100 %, checked every 5 epochs. Returns the final
    :func:`fastunlearn.metrics.basic_metrics` and the number of ``epochs`` run.
    """
    from tqdm.auto import tqdm

    from fastunlearn.methods import nll_mean
    from fastunlearn.metrics import basic_metrics

    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    )
    eval_batches = fdata.batches(examples, pad_id, 128)
    stats = {}
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step")
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            batch = fdata.collate([examples[j] for j in order[i : i + batch_size]], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = nll_mean(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            stats = basic_metrics(model, eval_batches)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['accuracy']:.3f}")
            stats["epochs"] = epoch + 1
            if stats["accuracy"] >= 1.0:
                break
    bar.close()
    model.eval()
    return stats


def _cache_key(size: DemoSize, seed: int) -> str:
    import hashlib

    # "v": bumped whenever the generated data or the models change (v2: perturbed answers worded as the
    # paraphrase), so a stale cache is never reused.
    blob = json.dumps({"v": 2, "size": asdict(size), "seed": seed}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastunlearn", "demo")


def prepare_models(
    cache_dir: str, size: DemoSize, *, seed: int = 0, progress: bool = True, log=print
) -> dict[str, str]:
    """Data files, tokenizer, memorising model and retain-only model under ``cache_dir`` (cached).

    Returns the paths: ``dir``, ``forget``, ``retain``, ``forget_perturbed``, ``retain_perturbed``,
    ``tokenizer``, ``full_model``, ``retain_model``.
    """

    root = os.path.join(cache_dir, f"{_cache_key(size, seed)}")
    paths = {
        "dir": root,
        "tokenizer": os.path.join(root, "tokenizer"),
        "full_model": os.path.join(root, "full_model"),
        "retain_model": os.path.join(root, "retain_model"),
    }
    splits = ("forget", "retain", "forget_perturbed", "retain_perturbed")
    paths.update({name: os.path.join(root, "data", f"{name}.json") for name in splits})
    done = os.path.join(root, "complete.json")
    if os.path.isfile(done):
        log(f"Using cached demo models in {root}")
        return paths

    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    dataset = generate_dataset(size.authors, seed=seed)
    for name in splits:
        write_jsonl(paths[name], dataset[name])
    log(
        f"Generated {size.authors} fictitious authors: {len(dataset['forget'])} forget and "
        f"{len(dataset['retain'])} retain question/answer pairs in {os.path.join(root, 'data')}"
    )

    prompt = fdata.TEMPLATES[DEMO_TEMPLATE][0]
    texts = [
        f"{prompt.format(question=r['question'])}{r['answer']} {r['paraphrased_question']} "
        f"{r['paraphrased_answer']} {' '.join(r['perturbed_answer'])}"
        for r in dataset["forget_perturbed"] + dataset["retain_perturbed"]
    ]
    tokenizer = train_tokenizer(texts, size.vocab)
    write_dir(paths["tokenizer"], tokenizer.save_pretrained)
    pad_id = fdata.pad_id_of(tokenizer)

    prep = dict(data_format="qa", template=DEMO_TEMPLATE, max_length=DEMO_MAX_LENGTH)
    forget = fdata.tokenize_records(dataset["forget"], tokenizer, **prep)
    retain = fdata.tokenize_records(dataset["retain"], tokenizer, **prep)
    summary = {}
    for key, examples, desc in (
        ("full_model", forget + retain, "memorise all authors"),
        ("retain_model", retain, "retain-only model"),
    ):
        model = build_model(tokenizer, size, seed=seed)
        stats = memorise(
            model,
            examples,
            pad_id,
            epochs=size.pretrain_epochs,
            lr=size.pretrain_lr,
            seed=seed,
            desc=desc,
            progress=progress,
        )
        summary[key] = stats

        def save(tmp: str, model=model) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        write_dir(paths[key], save)
    write_json(done, {"size": asdict(size), "seed": seed, "train_metrics": summary})
    return paths


# ---------------------------------------------------------------------------------------------------
# The job


def run_demo(
    output_dir: str,
    *,
    method: str = "ihl",
    init: str = "fila",
    seed: int = 0,
    size: str = "small",
    cache_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = 1,
    log=print,
):
    """Run the demo end to end and return the :class:`fastunlearn.trainer.UnlearnResult`.

    ``threads`` caps PyTorch's intra-op threads for the run (restored afterwards; ``None``: unchanged).
    The demo's matrices are a few hundred wide, too small for intra-op parallelism to pay, and on a busy
    machine OpenMP threads spin-waiting for a core multiply the run time (measured: 265 s with 2 threads
    against 60 s with 1 on a 2-core CPU shared with other jobs).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, method, init, seed, size, cache_dir, overwrite, progress, log)
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    output_dir: str,
    method: str,
    init: str,
    seed: int,
    size: str,
    cache_dir: str | None,
    overwrite: bool,
    progress: bool,
    log,
):
    from fastunlearn.cli import summary_table
    from fastunlearn.evaluation import cached_reference_truth_ratios, load_local_model
    from fastunlearn.trainer import check_output_dir, unlearn

    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {list(SIZES)}")
    spec = SIZES[size]
    # unlearn() checks too, but only after the models are built and evaluated: refuse before any work.
    check_output_dir(os.path.abspath(output_dir), overwrite=overwrite, resume=False)
    start = time.perf_counter()
    paths = prepare_models(cache_dir or default_cache_dir(), spec, seed=seed, progress=progress, log=log)
    reference = cached_reference_truth_ratios(
        paths["retain_model"],
        {"forget": paths["forget_perturbed"]},
        os.path.join(paths["dir"], "reference_truth_ratios.json"),
        **_tofu_options(),
    )
    full_model, tokenizer = load_local_model(paths["full_model"])
    before = _tofu_metrics(full_model, tokenizer, paths, reference)
    del full_model
    log(f"Unlearning {os.path.basename(paths['forget'])} with method={method}, init={init}")
    result = unlearn(
        paths["full_model"],
        None,
        paths["forget"],
        paths["retain"],
        method=method,
        init=init,
        output_dir=output_dir,
        template=DEMO_TEMPLATE,
        max_length=DEMO_MAX_LENGTH,
        seed=seed,
        lora_r=spec.lora_r,
        lora_alpha=2 * spec.lora_r,
        learning_rate=spec.unlearn_lr,
        num_epochs=spec.unlearn_epochs,
        batch_size=spec.unlearn_batch,
        gradient_accumulation_steps=1,
        fisher_batch_size=8,
        eval_batch_size=128,
        logging_steps=10,
        overwrite=overwrite,
        progress=progress,
    )
    result.metrics["before"]["tofu"] = before
    result.metrics["after"]["tofu"] = _tofu_metrics(result.model, result.tokenizer, paths, reference)
    write_json(result.metrics_path, result.metrics)
    log("")
    log(summary_table(_without_tofu(result.metrics)))
    log(_tofu_table(result.metrics["before"]["tofu"], result.metrics["after"]["tofu"]))
    log(
        f"\nDone in {time.perf_counter() - start:.1f} s. Outputs in {result.output_dir}; retain-only "
        f"reference model in {paths['retain_model']}"
    )
    return result


def _tofu_options() -> dict:
    # Greedy answers of up to 32 tokens: every demo answer is shorter, so ROUGE-L sees it whole.
    return dict(template=DEMO_TEMPLATE, max_length=DEMO_MAX_LENGTH, max_new_tokens=32, batch_size=64)


def _tofu_metrics(model, tokenizer, paths: dict[str, str], reference: list[float]) -> dict[str, float]:
    """TOFU's headline numbers (SPEC §4) on the demo's forget and retain sets.

    Forget quality is the KS-test p-value of the forget-set truth ratios against the retain-only
    model's (``reference``); model utility the harmonic mean of the retain set's probability, ROUGE-L
    recall and ``mean max(0, 1 − R)`` (3 of TOFU's 9 numbers: the demo has no real-authors or
    world-facts sets).
    """
    from fastunlearn.evaluation import evaluate_tofu, summarize_tofu

    sets = {"forget": paths["forget_perturbed"], "retain": paths["retain_perturbed"]}
    return summarize_tofu(
        evaluate_tofu(model, tokenizer, sets, reference_truth_ratios=reference, **_tofu_options())
    )


def _without_tofu(metrics: dict) -> dict:
    """``metrics`` with the per-split forget/retain numbers only (what ``summary_table`` renders)."""
    return {
        key: {k: v for k, v in value.items() if k != "tofu"} if key in ("before", "after") else value
        for key, value in metrics.items()
    }


_TOFU_ROWS = (
    ("forget_quality", "forget quality (KS p)"),
    ("model_utility_partial", "retain utility (3 of 9)"),
    ("forget_truth_ratio_mean", "forget truth ratio"),
    ("forget_rougeL_recall", "forget ROUGE-L"),
    ("retain_rougeL_recall", "retain ROUGE-L"),
    ("retain_truth_ratio", "retain max(0, 1-R)"),
)


def _tofu_table(before: dict, after: dict) -> str:
    """Before/after rows of the TOFU numbers (3 significant digits: forget quality spans decades)."""
    lines = [f"\n{'TOFU':<24}{'before':>12}{'after':>12}"]
    for key, label in _TOFU_ROWS:
        lines.append(f"{label:<24}{before[key]:>12.3g}{after[key]:>12.3g}")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fastunlearn demo``."""
    from fastunlearn.methods import METHODS
    from fastunlearn.trainer import INITS

    p = subparsers.add_parser(
        "demo",
        help="run the whole unlearning job offline on a synthetic data set (a few minutes on a CPU)",
        description="Run the whole unlearning job offline: generate a synthetic TOFU-format data set of "
        "fictitious authors (10% to forget), train a tokenizer, a small Llama model that memorises it and a "
        "retain-only reference model (both cached), unlearn the forget set, print before/after metrics and "
        "write OUTPUT/metrics.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", default="fastunlearn-demo", help="output directory (default: %(default)s)")
    p.add_argument(
        "--method", default="ihl", choices=METHODS, help="unlearning objective (default: %(default)s)"
    )
    p.add_argument(
        "--init", default="fila", choices=INITS, help="adapter initialisation (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data, models and training (default: 0)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help=f"where the data and pre-trained demo models are cached (default: {default_cache_dir()})",
    )
    p.add_argument(
        "--size",
        default="small",
        choices=list(SIZES),
        help="'tiny' is a reduced, faster demo used by the tests (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --output")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch intra-op threads; 1 is fastest for the demo's tiny model (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_main)
    return p


def _main(args: argparse.Namespace) -> int:
    run_demo(
        args.output,
        method=args.method,
        init=args.init,
        seed=args.seed,
        size=args.size,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        threads=args.threads,
    )
    return 0
