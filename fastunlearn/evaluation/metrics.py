"""The metrics on any causal LM, ``fastunlearn.metrics``; defined here those on text and statistics:
ROUGE-L (TOFU's and MUSE's), TOFU's forget quality and model utility (Maini et al. 2024)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fastunlearn.evaluation.decoding import greedy_decode
from fastunlearn.evaluation.extraction import extraction_likelihood, extraction_metrics, memorization_accuracy
from fastunlearn.evaluation.likelihood import (
    answer_metrics,
    answer_probability,
    answer_stats,
    basic_metrics,
    collect_answer_stats,
    example_stats,
    normalized_probability,
    token_nll,
    truth_ratio,
    truth_ratio_score,
)
from fastunlearn.models.devices import eval_mode

__all__ = [
    "answer_metrics",
    "answer_probability",
    "answer_stats",
    "basic_metrics",
    "collect_answer_stats",
    "eval_mode",
    "example_stats",
    "extraction_likelihood",
    "extraction_metrics",
    "forget_quality",
    "greedy_decode",
    "memorization_accuracy",
    "model_utility",
    "normalized_probability",
    "rouge_l_recall",
    "token_nll",
    "truth_ratio",
    "truth_ratio_score",
]

# Distinct texts whose tokens are remembered (a few MB at most): a run's reference answers and the
# greedy answers that repeat across its evaluations.
_TOKENIZED_TEXTS = 1 << 16


@functools.cache
def _rouge_l_scorer(stem: bool) -> Any:
    """``rouge_score``'s ROUGE-L scorer on lower-cased words (Porter-stemmed with ``stem``), remembering
    each text's tokens: stemming costs more than the LCS of a short answer, and the stopping rules score
    the same reference answers at every evaluation."""
    from rouge_score import rouge_scorer, tokenizers

    cached = functools.lru_cache(maxsize=_TOKENIZED_TEXTS)(
        tokenizers.DefaultTokenizer(use_stemmer=stem).tokenize
    )

    class CachedTokenizer(tokenizers.Tokenizer):
        def tokenize(self, text: str) -> list[str]:
            return list(cached(text))  # a copy: the cached list is never handed out

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CachedTokenizer())


def rouge_l(predictions: Sequence[str], references: Sequence[str], *, stem: bool) -> list[Any]:
    """ROUGE-L ``Score`` s (``recall = LCS / len(ref)``, ``fmeasure``) in words of each prediction:
    stemmed as TOFU scores, unstemmed as MUSE does."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _rouge_l_scorer(stem)
    return [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references)]


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """TOFU's ROUGE-L recall of each prediction against its reference."""
    return [score.recall for score in rouge_l(predictions, references, stem=True)]


def forget_quality(
    truth_ratios: Sequence[float] | torch.Tensor, reference_truth_ratios: Sequence[float] | torch.Tensor
) -> float:
    """Forget quality: the p-value of the two-sample Kolmogorov–Smirnov test between the unlearned
    model's forget-set truth ratios and the retain-only model's (high: the model behaves on the forget
    set as if it had never seen it). Invariant under monotone maps, so R or TOFU's 1/R alike."""
    from scipy.stats import ks_2samp

    a = torch.as_tensor(truth_ratios, dtype=torch.float64).flatten()
    b = torch.as_tensor(reference_truth_ratios, dtype=torch.float64).flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("forget quality needs non-empty truth-ratio samples")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("truth ratios must be finite")
    return float(ks_2samp(a.numpy(), b.numpy()).pvalue)


def model_utility(components: Mapping[str, float] | Iterable[float]) -> float:
    """Model utility: the harmonic mean ``k / Σ_i 1/x_i`` of TOFU's numbers in [0, 1] ({probability,
    ROUGE-L recall, ``mean max(0, 1 − R)``} on {retain, real authors, world facts}); a zero makes it 0,
    the point of a harmonic mean: one collapsed ability cannot be hidden by the others."""
    values = [float(v) for v in (components.values() if isinstance(components, Mapping) else components)]
    if not values:
        raise ValueError("model utility needs at least one component")
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"model utility components must lie in [0, 1], got {v}")
    return 0.0 if 0.0 in values else len(values) / sum(1.0 / v for v in values)
