"""The demo's data, tokenizer and models, made once and cached by size and seed.

The data: fictitious authors in TOFU's format (Maini et al. 2024), one question/answer pair per fact
with a paraphrase and five perturbed (wrong) answers worded as the paraphrase, all drawn from one seeded
``random.Random`` over ``words.json`` (``{n}``: the author's name, ``{v}``: the value). The models: a
byte-level BPE tokenizer, a small Llama model that memorises every answer, and one trained on the
retain authors only (the reference for forget quality).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from fastunlearn import data as fdata
from fastunlearn._io import write_dir, write_json, write_text
from fastunlearn.data.tofu_format import tofu_family

_WORDS = json.loads(resources.files(__package__).joinpath("words.json").read_text(encoding="utf-8"))
_LISTS = {"city": "cities", "genre": "genres", "father": "jobs", "mother": "jobs", "award": "awards"}
_FACTS = _WORDS["facts"]  # {field, question, answer, paraphrased_question, paraphrased_answer}
N_PERTURBED = 5


def _values(field: str, rng: random.Random) -> list[str]:
    """Every possible value of ``field`` (dates: a random sample, so perturbed dates stay plausible)."""
    if field == "date":
        months = _WORDS["months"]
        return [f"{rng.choice(months)} {rng.randint(1, 28)}, {rng.randint(1930, 1999)}" for _ in range(40)]
    if field == "book":
        return [f"The {a} {n}" for a in _WORDS["adjectives"] for n in _WORDS["nouns"]]
    return list(_WORDS[_LISTS[field]])


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        first = "".join(rng.choice(_WORDS["syllables"]) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_WORDS["syllables"]) for _ in range(rng.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name not in taken:
            taken.add(name)
            return name


def generate_dataset(n_authors: int, *, seed: int = 0, forget_fraction: float = 0.1) -> dict[str, list[dict]]:
    """Deterministic TOFU-format splits: ``forget``, ``retain`` (question and answer) and their
    ``*_perturbed`` versions (with the paraphrases, perturbed answers and author). The first
    ``ceil(forget_fraction · n_authors)`` authors are forgotten."""
    if n_authors < 2:
        raise ValueError(f"the demo needs at least 2 authors, got {n_authors}")
    rng = random.Random(seed)
    taken: set[str] = set()
    authors = []
    for _ in range(n_authors):
        name = _name(rng, taken)
        records = []
        for fact in _FACTS:
            values = _values(fact["field"], rng)
            value = rng.choice(values)
            wrong = rng.sample([v for v in values if v != value], N_PERTURBED)
            para = fact["paraphrased_answer"]
            records.append(
                {
                    "question": fact["question"].format(n=name),
                    "answer": fact["answer"].format(n=name, v=value),
                    "paraphrased_question": fact["paraphrased_question"].format(n=name),
                    "paraphrased_answer": para.format(n=name, v=value),
                    # TOFU perturbs the paraphrased answer: same wording, wrong fact, so the truth ratio
                    # P̄_pert / P̄_paraphrase compares like with like.
                    "perturbed_answer": [para.format(n=name, v=w) for w in wrong],
                    "author": name,
                }
            )
        authors.append(records)
    n_forget = max(1, math.ceil(forget_fraction * n_authors))
    perturbed = {
        "forget_perturbed": [r for records in authors[:n_forget] for r in records],
        "retain_perturbed": [r for records in authors[n_forget:] for r in records],
    }
    plain = {
        name.removesuffix("_perturbed"): [{"question": r["question"], "answer": r["answer"]} for r in rs]
        for name, rs in perturbed.items()
    }
    return {**plain, **perturbed}


def write_jsonl(path: str, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# TOFU's prompt convention for its Phi models: the demo is trained and evaluated as they were.
DEMO_TEMPLATE = "tofu-phi"
DEMO_MAX_LENGTH = 64


@dataclass(frozen=True)
class DemoSize:
    """Data and model sizes of a demo: the columns of :data:`SIZES`."""

    authors: int
    hidden: int
    layers: int
    vocab: int
    pretrain_epochs: int  # at most: memorising stops early at 100 % answer accuracy
    pretrain_lr: float
    unlearn_epochs: int
    unlearn_lr: float
    unlearn_batch: int
    lora_r: int


# "small" is the default. "tiny", the tests', is small enough for a test and large enough for the model
# to memorise its answers and IHL + FILA to forget the forgotten author's while keeping the others'.
SIZES = {
    # authors, hidden, layers, vocab; pretrain epochs, lr; unlearn epochs, lr, batch; LoRA rank
    "small": DemoSize(30, 128, 2, 1024, 40, 5e-3, 10, 1e-3, 4, 8),
    "tiny": DemoSize(10, 32, 2, 400, 100, 1e-2, 10, 3e-3, 4, 4),
}


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (``<pad>``, ``<s>``, ``</s>``; BOS prepended) as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
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
    model, examples: list[fdata.Example], pad_id: int, size: DemoSize, *, seed: int, desc: str, progress: bool
) -> dict[str, float]:
    """Train ``model`` on the answers of ``examples`` until it reproduces them: AdamW, linear warm-up
    over 10 % of the steps then cosine decay, stopping once teacher-forced answer accuracy (checked
    every 5 epochs) is 100 %. Returns the last :func:`basic_metrics` and the ``epochs`` run."""
    epochs, lr, batch_size = size.pretrain_epochs, size.pretrain_lr, 32
    from tqdm.auto import tqdm

    from fastunlearn.evaluation.likelihood import basic_metrics
    from fastunlearn.ops.nll import shifted_nll

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
            loss = shifted_nll(logits, batch["labels"], "mean")
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
    # "v": bumped whenever the generated data or the models change, so a stale cache is never reused.
    blob = json.dumps(
        {"v": 2, "size": asdict(size), "seed": seed, "template": DEMO_TEMPLATE}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastunlearn", "demo")


def prepare_models(
    cache_dir: str, size: DemoSize, *, seed: int = 0, progress: bool = True, log=print
) -> dict[str, str]:
    """Data files, tokenizer, memorising and retain-only models under ``cache_dir`` (made once); their
    paths: ``dir``, the four splits, ``tokenizer``, ``full_model``, ``retain_model``."""
    root = os.path.join(cache_dir, _cache_key(size, seed))
    folders = ("tokenizer", "full_model", "retain_model")
    paths = {"dir": root, **{name: os.path.join(root, name) for name in folders}}
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

    tags = tofu_family(DEMO_TEMPLATE)
    texts = [
        f"{tags.question_start}{r['question']}{tags.question_end}{tags.answer_tag}{r['answer']} "
        f"{r['paraphrased_question']} {r['paraphrased_answer']} {' '.join(r['perturbed_answer'])}"
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
        summary[key] = memorise(model, examples, pad_id, size, seed=seed, desc=desc, progress=progress)

        def save(tmp: str, model=model) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        write_dir(paths[key], save)
    write_json(done, {"size": asdict(size), "seed": seed, "train_metrics": summary})
    return paths
