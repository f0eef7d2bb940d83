"""Metrics built on text comparison and statistics (Maini et al. 2024): ROUGE-L recall, forget quality (a KS
test between truth-ratio samples) and model utility (a harmonic mean of TOFU's nine numbers)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = ["forget_quality", "model_utility", "rouge_l_recall"]


# Distinct texts whose tokens are remembered (a few MB at most): a run's reference answers and the
# greedy answers that repeat across its evaluations.
_TOKENIZED_TEXTS = 1 << 16


@functools.cache
def _rouge_l_scorer():
    """``rouge_score``'s ROUGE-L scorer with TOFU's tokenisation (lower-cased words, Porter stemming),
    built once and remembering each text's tokens: stemming costs more than the LCS of a short answer,
    and the stopping rules score the same reference answers at every evaluation near their threshold.
    The tokens of a text do not depend on when it is scored, so the scores are unchanged."""
    from rouge_score import rouge_scorer, tokenizers

    tofu_words = tokenizers.DefaultTokenizer(use_stemmer=True)
    cached = functools.lru_cache(maxsize=_TOKENIZED_TEXTS)(tofu_words.tokenize)

    class CachedTokenizer(tokenizers.Tokenizer):
        def tokenize(self, text: str) -> list[str]:
            return list(cached(text))  # a copy: the cached list is never handed out

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CachedTokenizer())


def rouge_l_recall(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference: ``LCS(pred, ref) / len(ref)`` in words.

    Uses Google's ``rouge_score`` package with Porter stemming, as TOFU does, so numbers compare with
    published ones.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _rouge_l_scorer()
    return [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]


def forget_quality(
    truth_ratios: Sequence[float] | torch.Tensor, reference_truth_ratios: Sequence[float] | torch.Tensor
) -> float:
    """Forget quality: p-value of the two-sample Kolmogorov–Smirnov test (Maini et al. 2024).

    Compares the unlearned model's forget-set truth ratios with those of the model trained on the
    retain set only. A high p-value means the two distributions cannot be told apart, i.e. the model
    behaves on the forget set as if it had never seen it. ``scipy.stats.ks_2samp`` (exact for small
    samples, asymptotic otherwise), raw p-value. The test is invariant under monotone maps, so it
    does not matter whether R or TOFU's 1/R is compared.
    """
    from scipy.stats import ks_2samp

    a = torch.as_tensor(truth_ratios, dtype=torch.float64).flatten()
    b = torch.as_tensor(reference_truth_ratios, dtype=torch.float64).flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("forget quality needs non-empty truth-ratio samples")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("truth ratios must be finite")
    return float(ks_2samp(a.numpy(), b.numpy()).pvalue)


def model_utility(components: Mapping[str, float] | Iterable[float]) -> float:
    """Model utility: harmonic mean of TOFU's nine numbers (Maini et al. 2024).

    The nine numbers are {probability, ROUGE-L recall, ``mean max(0, 1 − R)``} on {retain, real
    authors, world facts}. ``H = k / Σ_i 1/x_i``; a zero component makes H = 0 (its limit), which is
    the point of a harmonic mean: one collapsed ability cannot be hidden by the others. Components
    must lie in [0, 1].
    """
    values = list(components.values() if isinstance(components, Mapping) else components)
    if not values:
        raise ValueError("model utility needs at least one component")
    for v in values:
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"model utility components must lie in [0, 1], got {v}")
    if any(float(v) == 0.0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / float(v) for v in values)
