"""Membership-inference scores written plainly: one sequence per forward pass, the full fp64
distribution at every position (the oracle of ``fastunlearn.evaluation.mia``)."""

from __future__ import annotations

import math
import zlib

import torch


def sequence_scores_reference(model, tokenizer, text: str, *, k: float = 0.4, max_length: int = 512) -> dict:
    """LOSS, ZLib, Min-K% and Min-K%++ of one text: its tokens (special tokens added, cut at
    ``max_length``) in a batch of one, ``log p`` of every next token, ``μ_t = Σ p log p``,
    ``σ_t² = Σ p (log p)² − μ_t²`` (clamped at 1e-6), and the ``max(1, ⌊k·n⌋)`` smallest values sorted
    in Python."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    targets = ids[1:]
    n = len(targets)
    lp = [log_p[t, y].item() for t, y in enumerate(targets)]
    mu = (p * log_p).sum(-1)
    sigma = ((p * log_p**2).sum(-1) - mu**2).clamp_min(1e-6).sqrt()
    z = [(lp[t] - mu[t].item()) / sigma[t].item() for t in range(n)]
    count = max(1, math.floor(k * n))
    loss = -sum(lp) / n
    return {
        "loss": loss,
        "zlib": loss / len(zlib.compress(text.encode("utf-8"))),
        "min_k": -sum(sorted(lp)[:count]) / count,
        "min_k_plus_plus": -sum(sorted(z)[:count]) / count,
    }


def auc_reference(member, nonmember) -> float:
    """``P(nonmember > member) + ½ P(tie)`` counted over every pair."""
    wins = sum((h > f) + 0.5 * (h == f) for f in member for h in nonmember)
    return wins / (len(member) * len(nonmember))
