"""Unlearning metrics on any causal language model (SPEC §4), computed batched.

Answer-level statistics (TOFU): every quantity comes from the per-token negative log-likelihood of the
answer tokens under teacher forcing. With labels following the Hugging Face convention (``-100`` on the
prompt and padding, causal shift done here: logits at position ``t`` predict the token at ``t + 1``),
one forward pass per batch gives, per example,

    nll_sum    = Σ_t −log p(y_t | y_<t, q)           (answer tokens only, fp32)
    num_tokens = #answer tokens
    correct    = Σ_t 1[argmax_v p(v | y_<t, q) = y_t]

from which the length-normalised probability ``P̄(a|q) = exp(−nll_sum / num_tokens)`` follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from fastunlearn.data import IGNORE_INDEX


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode with gradients off, and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _require_batch(batch: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; expected keys {list(keys)}")
    shape = batch[keys[0]].shape
    if len(shape) != 2:
        raise ValueError(f"batch[{keys[0]!r}] must be 2-D [batch, seq], got shape {tuple(shape)}")
    for k in keys[1:]:
        if batch[k].shape != shape:
            raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {tuple(shape)}")


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted per-token NLL (fp32; fp64 for fp64 logits), the label mask and the teacher-forced hits,
    each ``[B, T-1]``.

    ``logits[:, t]`` scores ``labels[:, t + 1]``; positions whose label is ``-100`` get NLL 0 and are
    excluded from the mask. The log-softmax runs in fp32 for lower-precision logits.
    """
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe_target = target.masked_fill(~mask, 0)
    nll = F.cross_entropy(logits.transpose(1, 2), safe_target, reduction="none") * mask
    hits = (logits.argmax(dim=-1) == safe_target) & mask
    return nll, mask, hits


def answer_stats(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example answer statistics from one teacher-forced forward pass (no gradient).

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (``[B, T]``, ``-100`` ignored).
    Returns ``nll_sum`` (fp32; fp64 for an fp64 model), ``num_tokens`` and ``correct`` (int64), each
    ``[B]``, on the model's device. The caller chooses the mode; :func:`basic_metrics` switches to eval
    mode.
    """
    _require_batch(batch, ("input_ids", "attention_mask", "labels"))
    device = _model_device(model)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        )
        nll, mask, hits = token_nll(out.logits, batch["labels"].to(device))
    return {"nll_sum": nll.sum(dim=1), "num_tokens": mask.sum(dim=1), "correct": hits.sum(dim=1)}


def collect_answer_stats(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """:func:`answer_stats` over many batches, concatenated per example, in eval mode.

    Raises ``ValueError`` when there are no examples or an example has no answer token (its
    probability would be undefined).
    """
    parts: dict[str, list[torch.Tensor]] = {"nll_sum": [], "num_tokens": [], "correct": []}
    with eval_mode(model):
        for batch in batches:
            for key, value in answer_stats(model, batch).items():
                parts[key].append(value)
    if not parts["nll_sum"]:
        raise ValueError("no batches to evaluate: the data set is empty")
    stats = {key: torch.cat(values) for key, values in parts.items()}
    empty = (stats["num_tokens"] == 0).nonzero().flatten()
    if empty.numel():  # one sync per evaluation, not per batch
        raise ValueError(
            f"{empty.numel()} example(s) have no answer tokens (every label is -100), e.g. example "
            f"{int(empty[0])}; their answer probability is undefined"
        )
    return stats


def basic_metrics(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Mean length-normalised answer probability, teacher-forced accuracy and mean NLL (SPEC §4).

    - ``prob``: mean over examples of ``exp(−nll_sum / num_tokens)``;
    - ``accuracy``: total correct answer tokens / total answer tokens (token-level, teacher forced);
    - ``nll``: mean over examples of the per-token mean NLL ``nll_sum / num_tokens``.

    The model is evaluated in eval mode without gradients and its mode restored afterwards.
    """
    stats = collect_answer_stats(model, batches)
    mean_nll = stats["nll_sum"] / stats["num_tokens"]
    return {
        "prob": torch.exp(-mean_nll).mean().item(),
        "accuracy": (stats["correct"].sum() / stats["num_tokens"].sum()).item(),
        "nll": mean_nll.mean().item(),
    }


# ---------------------------------------------------------------------------------------------------
# Extraction metrics (Jang et al. 2023): memorisation accuracy and extraction likelihood
# ---------------------------------------------------------------------------------------------------


def _check_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ``input_ids`` / ``attention_mask`` and return the mask (all ones when absent)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a 2-D [batch, seq] tensor, got {type(input_ids).__name__} "
            f"of shape {tuple(getattr(input_ids, 'shape', ()))}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids holds no sequence")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, "
            f"expected {tuple(input_ids.shape)} like input_ids"
        )
    return attention_mask.to(input_ids.device)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # With left padding a sequence's first real token must still sit at position 0.
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _real_tokens(input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's real tokens (padding on either side dropped), with two host syncs for the whole batch."""
    keep = mask != 0
    return list(input_ids[keep].split(keep.sum(dim=1).tolist()))


def _sequences(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    min_tokens: int,
    what: str,
) -> list[torch.Tensor]:
    """Validated real-token sequences on the model's device, each of at least ``min_tokens`` tokens."""
    mask = _check_sequences(input_ids, attention_mask)
    device = _model_device(model)
    seqs = _real_tokens(input_ids.to(device), mask.to(device))
    short = next((b for b, s in enumerate(seqs) if len(s) < min_tokens), None)
    if short is not None:
        raise ValueError(
            f"{what} needs at least {min_tokens} real tokens per sequence; sequence {short} has "
            f"{len(seqs[short])}"
        )
    return seqs


def _teacher_forced_hits(model: torch.nn.Module, seqs: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """``hits[b, t−1] = 1[argmax_v p(v | x_<t) = x_t]`` for t = 1..T_b−1 of each sequence, False past its
    end: a ``[B, W−1]`` bool tensor, W the longest length, on the model's device.

    One forward pass per batch of ``batch_size`` right-padded sequences (causal attention: padding after
    a sequence's tokens changes nothing they see). Both extraction metrics derive from it: MA is the
    mean of a row, and the rows' misses are :func:`_el_batched`'s divergence points.
    """
    device = _model_device(model)
    hits = torch.zeros((len(seqs), max(len(s) for s in seqs) - 1), dtype=torch.bool, device=device)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = s
            mask[r, : len(s)] = 1
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(dim=-1)
        hits[start : start + len(chunk), : width - 1] = (pred == ids[:, 1:]) & (mask[:, 1:] != 0)
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
    """Memorisation accuracy per sequence, teacher forced (SPEC §4; Jang et al. 2023, Eq. 2).

        MA(x) = 1/(T−1) · Σ_{t=1}^{T−1} 1[argmax_v p(v | x_<t) = x_t]

    One forward pass per batch gives every ``argmax_v p(v | x_<t)`` at once (the original code called
    ``generate`` once per position for the same numbers). Padding may sit on either side; ``T`` is each
    sequence's own number of real tokens. Returns a float64 ``[B]`` tensor on the model's device.
    :func:`extraction_metrics` gives MA and EL_n from one shared forward pass.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    seqs = _sequences(model, input_ids, attention_mask, 2, "memorization_accuracy")
    with eval_mode(model):
        hits = _teacher_forced_hits(model, seqs, batch_size or len(seqs))
    return _accuracy(hits, seqs)


def _decode_arguments(model: torch.nn.Module) -> tuple[str, dict[str, int]]:
    """The forward argument that takes the KV cache (``cache`` from transformers 5.2x on, before that
    ``past_key_values``), and the argument limiting logits to the last position where the model has one
    (``logits_to_keep``; ``num_logits_to_keep`` in older versions): prefill then skips the vocabulary
    projection of every prompt position."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    keep = next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})
    return ("cache" if "cache" in params else "past_key_values"), keep


def _output_cache(out: Mapping[str, object]) -> object:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def greedy_decode(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Greedy continuation of a batch of prompts of any lengths, with a KV cache.

    Prompts are left padded (position ids follow the mask, so padding changes nothing but rounding).
    Without ``eos_token_id`` exactly ``max_new_tokens`` tokens are generated per prompt (the
    extraction protocol never stops early). With it, a row stops at its first EOS — later positions
    hold ``pad_token_id`` — and decoding ends once every row has stopped.
    Returns ``[R, max_new_tokens]`` token ids (or fewer columns when every row stopped early).
    Must be called under :func:`eval_mode`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("greedy_decode needs at least one prompt, each of at least one token")
    device = _model_device(model)
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p.to(device)
        mask[r, width - len(p) :] = 1
    positions = _position_ids(mask)
    cache_arg, keep_last = _decode_arguments(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
    next_tok = out.logits[:, -1].argmax(dim=-1)
    position = positions[:, -1:]
    generated = [next_tok]
    done = next_tok == eos_token_id if eos_token_id is not None else None
    for _ in range(max_new_tokens - 1):
        if done is not None and bool(done.all()):  # one sync per step, only when stopping at EOS
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        position = position + 1
        out = model(
            input_ids=next_tok[:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **keep_last,
            **{cache_arg: _output_cache(out)},
        )
        next_tok = out.logits[:, -1].argmax(dim=-1)
        if done is not None:
            next_tok = next_tok.masked_fill(done, pad_token_id)
            done = done | (next_tok == eos_token_id)
        generated.append(next_tok)
    return torch.stack(generated, dim=1)


def _ngram_overlap(gen: torch.Tensor, true: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``overlap_n`` for each row: #n-grams of ``gen`` found in the set of n-grams of ``true`` over
    #n-grams of ``true`` (SPEC §4). Rows are left aligned; row r uses its first ``lengths[r]`` tokens.

    Exact and vectorised: every n-gram (a row of an ``[M, n]`` tensor) gets an integer id from
    ``torch.unique``; membership is then ``torch.isin`` on (row, id) keys. Returns float64 ``[R]``.
    """
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
    """Extraction likelihood sharing work across prefixes, from :func:`_teacher_forced_hits`' ``hits``.

    Greedy decoding is a deterministic function of the prefix, so if the teacher-forced prediction at
    t is the true token (``argmax p(· | x_<t) = x_t``), the greedy run from ``x_<t`` emits ``x_t`` and
    then *is* the greedy run from ``x_<t+1``. Hence every prefix's continuation is
    ``x[t:s] ++ greedy(x_<s)`` with ``s`` the first divergence point ``≥ t`` (or ``x[t:T]`` when none):
    the teacher-forced pass finds the divergence points, and only those prefixes are decoded, all of
    them (over every sequence) as batches of ``batch_size`` rows with a KV cache, longest first. A
    memorised sequence has few divergence points, so its O(T²) generated tokens shrink to nearly
    nothing. A sequence the model does not know diverges almost everywhere: then only the larger
    batches help, which matters on a GPU (a decode step costs about the same for 32 or 256 rows) and
    little on a CPU, where decoding is compute-bound (``benchmarks/bench_extraction.py`` measures the
    memorised, partly memorised and unmemorised cases).
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

    # Scored one sequence at a time: one torch.unique over all sequences' n-grams measured ~30%
    # slower on a CPU (32 sequences of 200 tokens).
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


def _check_extraction_options(n: int, method: str, batch_size: int) -> None:
    if method not in ("batched", "naive"):
        raise ValueError(f"unknown method {method!r}; expected 'batched' or 'naive'")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")


def _extraction(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    n: int,
    method: str,
    batch_size: int,
    with_ma: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    _check_extraction_options(n, method, batch_size)
    seqs = _sequences(model, input_ids, attention_mask, n + 1, f"EL_{n}")
    with eval_mode(model):
        # The naive method decodes every prefix itself: it needs the teacher-forced pass only for MA.
        hits = _teacher_forced_hits(model, seqs, batch_size) if with_ma or method == "batched" else None
        if method == "batched":
            el = _el_batched(model, seqs, hits, n, batch_size)
        else:
            el = _el_naive(model, seqs, n, batch_size)
    return (_accuracy(hits, seqs).cpu() if with_ma else None), el.cpu()


def extraction_likelihood(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    n: int = 10,
    attention_mask: torch.Tensor | None = None,
    method: str = "batched",
    batch_size: int = 64,
) -> torch.Tensor:
    """Extraction likelihood ``EL_n`` per sequence (SPEC §4; Jang et al. 2023, Eq. 1).

        EL_n(x) = 1/(T−n) · Σ_{t=1}^{T−n} overlap_n(greedy(x_<t), x_≥t)

    ``greedy(x_<t)`` is the greedy continuation of the first t tokens to total length T (no stop at
    EOS), and ``overlap_n(a, b)`` the number of n-grams of ``a`` that occur among the n-grams of
    ``b``, over the number of n-grams of ``b``. Padding may sit on either side; each sequence needs
    more than ``n`` real tokens.

    ``method="batched"`` (default) shares work across prefixes (see :func:`_el_batched`) and decodes
    ``batch_size`` rows at a time; ``method="naive"`` decodes each prefix length separately, the
    original algorithm, kept as the reference. Both give the same numbers (up to the rounding of
    batched matrix products deciding an exact argmax tie). Returns a float64 ``[B]`` tensor (CPU).
    """
    return _extraction(
        model, input_ids, attention_mask, n=n, method=method, batch_size=batch_size, with_ma=False
    )[1]


def extraction_metrics(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    n: int = 10,
    attention_mask: torch.Tensor | None = None,
    method: str = "batched",
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(MA, EL_n)`` per sequence, each a float64 ``[B]`` CPU tensor (SPEC §4): the extraction protocol.

    MA is :func:`memorization_accuracy`, EL_n :func:`extraction_likelihood` (same arguments); the
    teacher-forced forward pass that gives MA also gives the batched method's divergence points, so
    it runs once for both. Each sequence needs more than ``n`` real tokens.
    """
    ma, el = _extraction(
        model, input_ids, attention_mask, n=n, method=method, batch_size=batch_size, with_ma=True
    )
    assert ma is not None  # with_ma=True
    return ma, el


# ---------------------------------------------------------------------------------------------------
# TOFU metrics (Maini et al. 2024)
# ---------------------------------------------------------------------------------------------------


def answer_probability(stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Length-normalised probability ``P̄(a|q) = exp(−nll_sum / num_tokens)`` per example (SPEC §4),
    from :func:`answer_stats` / :func:`collect_answer_stats` output."""
    return torch.exp(-stats["nll_sum"].double() / stats["num_tokens"].double())


def normalized_probability(true_prob: torch.Tensor, perturbed_prob: torch.Tensor) -> torch.Tensor:
    """Probability of the true answer normalised over the options: ``P̄_true / (P̄_true + Σ_k P̄_pert,k)``.

    TOFU scores the real-authors and world-facts sets this way (multiple choice between the true
    answer and its perturbed versions). ``true_prob`` is ``[N]``, ``perturbed_prob`` ``[N, K]``.
    """
    _check_option_shapes(true_prob, perturbed_prob)
    return true_prob / (true_prob + perturbed_prob.sum(dim=1))


def truth_ratio(true_prob: torch.Tensor, perturbed_prob: torch.Tensor) -> torch.Tensor:
    """Truth ratio ``R = P̄_pert / P̄_true`` per example (SPEC §4).

    ``P̄_pert`` is the geometric mean of the K perturbed answers' length-normalised probabilities,
    i.e. ``exp(mean_k log P̄_pert,k)``; computed in log space, so ``R = exp(mean_k log P̄_pert,k −
    log P̄_true)``. ``true_prob`` is ``[N]`` (the paraphrased answer on forget/retain, the original
    one on real authors / world facts), ``perturbed_prob`` ``[N, K]``. R < 1: the model prefers the
    truth; R ≈ 1: it cannot tell the truth from plausible falsehoods.
    """
    _check_option_shapes(true_prob, perturbed_prob)
    return torch.exp(perturbed_prob.log().mean(dim=1) - true_prob.log())


def _check_option_shapes(true_prob: torch.Tensor, perturbed_prob: torch.Tensor) -> None:
    if true_prob.dim() != 1 or perturbed_prob.dim() != 2 or perturbed_prob.shape[0] != true_prob.shape[0]:
        raise ValueError(
            f"expected true [N] and perturbed [N, K] probabilities, got {tuple(true_prob.shape)} "
            f"and {tuple(perturbed_prob.shape)}"
        )
    if perturbed_prob.shape[1] == 0:
        raise ValueError("perturbed probabilities need at least one perturbed answer per item (K ≥ 1)")


def truth_ratio_score(ratios: torch.Tensor) -> float:
    """TOFU's utility component from truth ratios: ``mean max(0, 1 − R)`` (SPEC §4)."""
    return torch.clamp(1 - ratios.double(), min=0).mean().item()


def rouge_l_recall(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L recall of each prediction against its reference: ``LCS(pred, ref) / len(ref)`` in words.

    Uses Google's ``rouge_score`` package with Porter stemming, as TOFU does, so numbers compare with
    published ones.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]


def forget_quality(
    truth_ratios: Sequence[float] | torch.Tensor, reference_truth_ratios: Sequence[float] | torch.Tensor
) -> float:
    """Forget quality: p-value of the two-sample Kolmogorov–Smirnov test (SPEC §4).

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
    """Model utility: harmonic mean of TOFU's nine numbers (SPEC §4).

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
