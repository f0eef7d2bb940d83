"""A directory for end-to-end runs: the tiny demo model saved as a Hugging Face model directory (hidden
32, 2 layers, its own tokenizer) and forget/retain JSON Lines files of its synthetic authors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastunlearn import demo

# The tiny demo model (hidden 32, 2 layers) on 4 authors.
SIZE = dataclasses.replace(demo.SIZES["tiny"], authors=4, hidden=32, layers=2, vocab=300)


def build_workspace(root: Path) -> Path:
    """``root/model`` (weights + tokenizer), ``root/forget.json`` and ``root/retain.json`` (6 records
    each, TOFU's ``{question, answer}``); returns ``root``."""
    data = demo.generate_dataset(SIZE.authors, seed=1)
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}"
        for r in data["forget_perturbed"] + data["retain_perturbed"]
    ]
    tokenizer = demo.train_tokenizer(texts, SIZE.vocab)
    model = demo.build_model(tokenizer, SIZE, seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name in ("forget", "retain"):
        demo.write_jsonl(str(root / f"{name}.json"), data[name][:6])
    demo.write_jsonl(str(root / "forget_perturbed.json"), data["forget_perturbed"][:6])
    return root
