"""The demo's synthetic data set: fictitious authors in TOFU's format (Maini et al. 2024).

Each author gets one question/answer pair per fact, with a paraphrased question and answer and five
perturbed (wrong) answers worded as the paraphrase. The vocabulary and each fact's phrasing are package
data (``words.json``; ``{n}`` is the author's name, ``{v}`` the value), and everything is drawn from one
seeded ``random.Random``, so a seed gives the same data anywhere.
"""

from __future__ import annotations

import json
import math
import random
from importlib import resources

from fastunlearn._io import write_text

_WORDS = json.loads(resources.files(__package__).joinpath("words.json").read_text(encoding="utf-8"))
_LISTS = {"city": "cities", "genre": "genres", "father": "jobs", "mother": "jobs", "award": "awards"}
# (field, question, answer, paraphrased question, paraphrased answer)
_FACTS = tuple(
    (f["field"], f["question"], f["answer"], f["paraphrased_question"], f["paraphrased_answer"])
    for f in _WORDS["facts"]
)
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
                    # P̄_pert / P̄_paraphrase compares like with like.
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
