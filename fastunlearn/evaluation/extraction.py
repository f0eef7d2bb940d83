"""The extraction protocol (Jang et al. 2023, arXiv:2210.01504) on raw token sequences: memorisation
accuracy from one teacher-forced pass, extraction likelihood ``EL_n`` from greedy continuations of
every prefix, of which only the teacher-forced misses need decoding; :func:`evaluate_extraction` on
texts, tokenised as the training data is."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from fastunlearn import data as fdata
from fastunlearn.engines import distributed
from fastunlearn.evaluation.decoding import greedy_decode
from fastunlearn.models.devices import eval_mode, model_device


def _sequences(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    min_tokens: int,
    what: str,
) -> list[torch.Tensor]:
    """Each row's real tokens (padding on either side dropped) on the model's device, checked to hold at
    least ``min_tokens``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a 2-D [batch, seq] tensor, got {type(input_ids).__name__} "
            f"of shape {tuple(getattr(input_ids, 'shape', ()))}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids holds no sequence")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(input_ids.shape)}")
    device = model_device(model)
    keep = mask.to(device) != 0
    seqs = list(input_ids.to(device)[keep].split(keep.sum(dim=1).tolist()))  # two host syncs in all
    short = next((b for b, s in enumerate(seqs) if len(s) < min_tokens), None)
    if short is not None:
        raise ValueError(
            f"{what} needs at least {min_tokens} real tokens per sequence; sequence {short} has "
            f"{len(seqs[short])}"
        )
    return seqs


def _teacher_forced_hits(model: torch.nn.Module, seqs: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """``hits[b, t−1] = 1[argmax_v p(v | x_<t) = x_t]`` for t = 1..T_b−1, False past each end: ``[B, W−1]``
    bool, one forward per batch of right-padded sequences (causal: padding after a sequence changes
    nothing it sees). MA is a row's mean; its misses are :func:`_el_batched`'s divergence points."""
    device = model_device(model)
    hits = torch.zeros((len(seqs), max(len(s) for s in seqs) - 1), dtype=torch.bool, device=device)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids = pad_sequence(chunk, batch_first=True).long()  # right padded with 0
        mask = pad_sequence([torch.ones_like(s) for s in chunk], batch_first=True)
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1)[:, :-1]  # no logits slice
        hits[start : start + len(chunk), : ids.shape[1] - 1] = (pred == ids[:, 1:]) & (mask[:, 1:] != 0)
    return hits


def _accuracy(hits: torch.Tensor, seqs: list[torch.Tensor]) -> torch.Tensor:
    lengths = torch.tensor([len(s) for s in seqs], device=hits.device)
    return hits.sum(dim=1).double() / (lengths - 1).double()


def memorization_accuracy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Memorisation accuracy per sequence (Jang et al. 2023, Eq. 2), float64 ``[B]`` on the model's device:

        MA(x) = 1/(T−1) · Σ_{t=1}^{T−1} 1[argmax_v p(v | x_<t) = x_t]

    from one forward pass per batch; ``T`` is each sequence's own number of real tokens."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    seqs = _sequences(model, input_ids, attention_mask, 2, "memorization_accuracy")
    with eval_mode(model):
        hits = _teacher_forced_hits(model, seqs, batch_size or len(seqs))
    return _accuracy(hits, seqs)


def _ngram_overlap(gen: torch.Tensor, true: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``overlap_n`` of each left-aligned row (its first ``lengths[r]`` tokens): #n-grams of ``gen`` among
    those of ``true`` over #n-grams of ``true``, float64 ``[R]``. Every n-gram gets an integer id from
    ``torch.unique``; membership is ``torch.isin`` on (row, id) keys."""
    rows, width = gen.shape
    count = lengths - n + 1  # number of n-grams per row (≥ 1 by construction)
    starts = torch.arange(width - n + 1, device=gen.device)
    valid = starts[None, :] < count[:, None]
    gen_grams, true_grams = gen.unfold(1, n, 1)[valid], true.unfold(1, n, 1)[valid]
    _, ids = torch.unique(torch.cat([gen_grams, true_grams]), dim=0, return_inverse=True)
    row_of = torch.arange(rows, device=gen.device)[:, None].expand_as(valid)[valid]
    num_ids = ids.numel()  # > every id, and on the host already (int(ids.max()) would be another sync)
    gen_keys = row_of * num_ids + ids[: gen_grams.shape[0]]
    true_keys = row_of * num_ids + ids[gen_grams.shape[0] :]
    found = torch.isin(gen_keys, true_keys).double()
    hits = torch.zeros(rows, dtype=torch.float64, device=gen.device).index_add_(0, row_of, found)
    return hits / count.double()


def _divergence_points(hits: torch.Tensor, lengths: list[int], n: int) -> list[list[int]]:
    """Per sequence, the sorted divergence points ``s`` (``argmax p(· | x_<s) ≠ x_s``) that some prefix
    length t ≤ T−n needs: every s ≤ T−n, and the first s > T−n (prefixes past the last point ≤ T−n
    continue from it); later ones are never used. One host sync for all sequences."""
    last_col = torch.tensor(lengths, device=hits.device)[:, None] - 1
    misses = ~hits & (torch.arange(hits.shape[1], device=hits.device)[None, :] < last_col)
    points: list[list[int]] = [[] for _ in lengths]
    for b, col in misses.nonzero().tolist():  # row-major: each sequence's points in increasing order
        s, last_t = col + 1, lengths[b] - n
        if s <= last_t or not points[b] or points[b][-1] <= last_t:
            points[b].append(s)
    return points


def _continuations(
    seq: torch.Tensor, points: list[int], branch: dict[int, torch.Tensor], n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For t = 1..T−n, the greedy continuation of ``x_<t`` and the true one ``x_≥t`` as rows of
    ``[T−n, T−1]`` tensors (left aligned, filled past ``T − t`` tokens), and the lengths ``T − t``."""
    length = len(seq)
    width = length - 1
    # Row k of `full` is the whole sequence as seen by a prefix whose first divergence is points[k]:
    # true tokens before it, the greedy branch after; the last row never diverges.
    full = seq.repeat(len(points) + 1, 1)
    for k, s in enumerate(points):
        full[k, s:] = branch[s]
    t = torch.arange(1, length - n + 1, device=seq.device)
    row = torch.searchsorted(torch.tensor(points, dtype=torch.long, device=seq.device), t)
    cols = t[:, None] + torch.arange(width, device=seq.device)[None, :]
    in_range = cols < length
    cols = cols.clamp(max=length - 1)
    gen = torch.where(in_range, full[row[:, None], cols], -1)
    true = torch.where(in_range, seq[cols], -2)
    return gen, true, length - t


def _el_batched(
    model: torch.nn.Module, seqs: list[torch.Tensor], hits: torch.Tensor, n: int, batch_size: int
) -> torch.Tensor:
    """Extraction likelihood decoding only the divergence points of :func:`_teacher_forced_hits`.

    Greedy decoding is a function of the prefix: where the teacher-forced prediction at t is ``x_t``,
    the run from ``x_<t`` is the run from ``x_<t+1``. So every prefix continues as
    ``x[t:s] ++ greedy(x_<s)``, ``s`` the first divergence point ``≥ t``, and a memorised sequence's
    O(T²) generated tokens shrink to nearly nothing.
    """
    lengths = [len(s) for s in seqs]
    points = _divergence_points(hits, lengths, n)
    branch_rows = [(b, s) for b, ps in enumerate(points) for s in ps]
    # Longest continuation first, so that each batch's rows need similar numbers of steps.
    branch_rows.sort(key=lambda bs: lengths[bs[0]] - bs[1], reverse=True)
    branches: list[dict[int, torch.Tensor]] = [{} for _ in seqs]  # per sequence: s -> greedy(x_<s)
    for start in range(0, len(branch_rows), batch_size):
        chunk = branch_rows[start : start + batch_size]
        steps = max(lengths[b] - s for b, s in chunk)
        gen = greedy_decode(model, [seqs[b][:s] for b, s in chunk], steps)
        for r, (b, s) in enumerate(chunk):
            branches[b][s] = gen[r, : lengths[b] - s]

    # Scored one sequence at a time: a torch.unique over every sequence's n-grams is slower.
    scores = [
        _ngram_overlap(*_continuations(seq, points[b], branches[b], n), n).mean()
        for b, seq in enumerate(seqs)
    ]
    return torch.stack(scores).cpu()


def _ngram_overlap_python(gen: list[int], true: list[int], n: int) -> float:
    """The original per-example loop (Jang et al.'s code): the reference for the vectorised one."""
    true_grams = [tuple(true[i : i + n]) for i in range(len(true) - n + 1)]
    true_set = set(true_grams)
    hits = sum(tuple(gen[i : i + n]) in true_set for i in range(len(gen) - n + 1))
    return hits / len(true_grams)


def _el_naive(model: torch.nn.Module, seqs: list[torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    """Extraction likelihood by definition: one greedy decode per prefix length t (batched over the
    sequences that have that prefix, as in the original code), scored with the per-example loop."""
    overlaps: list[list[float]] = [[] for _ in seqs]  # per sequence, in order of t
    for t in range(1, max(len(s) for s in seqs) - n + 1):
        rows = [b for b, s in enumerate(seqs) if len(s) - n >= t]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            steps = max(len(seqs[b]) for b in chunk) - t
            gen = greedy_decode(model, [seqs[b][:t] for b in chunk], steps)
            for r, b in enumerate(chunk):
                true = seqs[b][t:].tolist()
                overlaps[b].append(_ngram_overlap_python(gen[r, : len(true)].tolist(), true, n))
    # The same fp64 reduction as the batched method, so equal overlaps give bit-identical means.
    return torch.stack([torch.tensor(o, dtype=torch.float64).mean() for o in overlaps])


def extraction_metrics(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    n: int = 10,
    attention_mask: torch.Tensor | None = None,
    method: str = "batched",
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(MA, EL_n)`` per sequence (Jang et al. 2023, Eq. 2 and 1), float64 ``[B]`` CPU tensors::

        EL_n(x) = 1/(T−n) · Σ_{t=1}^{T−n} overlap_n(greedy(x_<t), x_≥t)

    ``greedy(x_<t)`` continues the first t tokens to length T (no stop at EOS); ``overlap_n(a, b)`` is
    the share of ``b``'s n-grams among ``a``'s. Each sequence needs more than ``n`` real tokens.
    ``method="batched"`` shares work across prefixes (:func:`_el_batched`); ``"naive"`` decodes every
    prefix, the reference: both agree up to an argmax tie broken by rounding.
    """
    if method not in ("batched", "naive"):
        raise ValueError(f"unknown method {method!r}; expected 'batched' or 'naive'")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    seqs = _sequences(model, input_ids, attention_mask, n + 1, f"EL_{n}")
    with eval_mode(model):
        hits = _teacher_forced_hits(model, seqs, batch_size)
        if method == "batched":
            el = _el_batched(model, seqs, hits, n, batch_size)
        else:
            el = _el_naive(model, seqs, n, batch_size)
    return _accuracy(hits, seqs).cpu(), el.cpu()


def extraction_likelihood(model: torch.nn.Module, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
    """Extraction likelihood ``EL_n`` per sequence: :func:`extraction_metrics`' second tensor."""
    return extraction_metrics(model, input_ids, **options)[1]


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], *, max_length: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of raw texts cut to ``max_length`` tokens (the extraction sets use 200), right padded:
    ``(input_ids, attention_mask)``."""
    records = [{"text": t, "_source": f"text {i}"} for i, t in enumerate(texts)]
    with warnings.catch_warnings():  # cutting to max_length is the protocol here, not an accident
        warnings.simplefilter("ignore", UserWarning)
        examples = fdata.tokenize_records(records, tokenizer, data_format="text", max_length=max_length)
    batch = fdata.collate(examples, fdata.pad_id_of(tokenizer))
    return batch["input_ids"], batch["attention_mask"]


def evaluate_extraction(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | Sequence[str],
    *,
    n: int = 10,
    max_length: int = 200,
    batch_size: int = 64,
    method: str = "batched",
) -> dict[str, Any]:
    """Mean memorisation accuracy and ``EL_n`` over ``{"text"}`` records (a file) or strings, each cut to
    ``max_length`` tokens, shared by the ranks."""
    if isinstance(data, (str, os.PathLike)):
        records, _ = fdata.load_records(data, data_format="text")
        texts = [r["text"] for r in records]
    else:
        texts = list(data)
        if not texts:
            raise ValueError("no sequences to evaluate")

    def per_sequence(part: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = tokenize_texts(tokenizer, part, max_length=max_length)
        ma, el = extraction_metrics(
            model, ids, n=n, attention_mask=mask, method=method, batch_size=batch_size
        )
        return {"ma": ma, "el": el}

    scores = distributed.map_sharded(per_sequence, texts, model=model)
    ma, el = scores["ma"], scores["el"]
    return {
        "protocol": "extraction",
        "num_sequences": len(texts),
        "n": n,
        "ma": ma.mean().item(),
        f"el_{n}": el.mean().item(),
        "per_sequence": {"ma": ma.tolist(), f"el_{n}": el.tolist()},
    }
