"""Tests of fastunlearn.metrics: hand-computed examples on a bigram model whose probabilities are known
exactly, fp64 references and per-position loops on a tiny random Llama, and scipy for the KS test."""

import math

import pytest
import torch
from helpers.models import tiny_llama
from scipy.stats import ks_2samp
from torch import nn

from fastunlearn import metrics as M
from fastunlearn.evaluation.extraction import (
    _divergence_points,
    _ngram_overlap,
    _ngram_overlap_python,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Out(dict):
    __getattr__ = dict.__getitem__


class Bigram(nn.Module):
    """``logits[t] = log P[x_t]``: a model whose next-token distribution depends on the current token
    only, so probabilities and greedy continuations are computable by hand. Speaks the transformers
    calling convention used by the metrics (attention mask, position ids, cache, logits_to_keep)."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.log_probs = nn.Parameter(probs.double().log().float(), requires_grad=False)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0
    ):
        logits = self.log_probs[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return Out(logits=logits, cache=object() if use_cache else None)


# A 3-token bigram: the greedy chain is 0 -> 1 -> 2 -> 0 -> ...
P3 = torch.tensor([[0.25, 0.5, 0.25], [0.125, 0.125, 0.75], [0.5, 0.25, 0.25]])


# --------------------------------------------------------------------------------------------------
# answer statistics and basic metrics


def test_answer_stats_and_basic_metrics_hand_computed():
    model = Bigram(P3)
    ids = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 1]])
    labels = torch.tensor([[-100, 1, 2, 0], [-100, -100, 1, -100]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    stats = M.answer_stats(model, batch)
    # Example 0: P(1|0) P(2|1) P(0|2) = 0.5 · 0.75 · 0.5; example 1: P(1|2) = 0.25.
    nll0 = -(math.log(0.5) + math.log(0.75) + math.log(0.5))
    nll1 = -math.log(0.25)
    torch.testing.assert_close(stats["nll_sum"].double(), torch.tensor([nll0, nll1], dtype=torch.float64))
    assert stats["num_tokens"].tolist() == [3, 1]
    # Greedy from 0 is 1 (hit), from 1 is 2 (hit), from 2 is 0 (hit); from 2 the argmax 0 ≠ 1.
    assert stats["correct"].tolist() == [3, 0]
    model.train()
    out = M.basic_metrics(model, [batch])
    assert model.training  # mode restored
    prob = (math.exp(-nll0 / 3) + math.exp(-nll1)) / 2
    assert out["prob"] == pytest.approx(prob, rel=1e-6)
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["nll"] == pytest.approx((nll0 / 3 + nll1) / 2, rel=1e-6)


def test_answer_stats_matches_fp64_reference_on_llama():
    model = tiny_llama(32, seed=1).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    stats = M.answer_stats(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    logits = model.double()(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    ref = -(logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * valid).sum(1)
    hits = ((logits[:, :-1].argmax(-1) == tgt) & valid).sum(1)
    torch.testing.assert_close(stats["nll_sum"].double(), ref, rtol=1e-5, atol=1e-5)
    assert stats["num_tokens"].tolist() == valid.sum(1).tolist()
    assert stats["correct"].tolist() == hits.tolist()


def test_basic_metrics_errors():
    model = Bigram(P3)
    with pytest.raises(ValueError, match="empty"):
        M.basic_metrics(model, [])
    ids = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="no answer tokens"):
        M.basic_metrics(model, [{"input_ids": ids, "attention_mask": ids * 0 + 1, "labels": ids * 0 - 100}])
    with pytest.raises(ValueError, match="missing"):
        M.answer_stats(model, {"input_ids": ids})


# --------------------------------------------------------------------------------------------------
# memorisation accuracy


def test_memorization_accuracy_hand_computed():
    # Greedy chain 0 1 2 0 1 2 ...: the sequence 0 1 2 2 0 hits at t = 1, 2, 4 (x_3 = 2 ≠ argmax 0).
    ma = M.memorization_accuracy(Bigram(P3), torch.tensor([[0, 1, 2, 2, 0]]))
    assert ma.tolist() == [3 / 4]


@pytest.mark.parametrize("side", ["right", "left"])
def test_memorization_accuracy_equals_per_position_loop(side):
    model = tiny_llama(8, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 8, (4, 13), generator=g)
    lengths = [13, 9, 2, 11]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, 13 - n :] = 1
    ma = M.memorization_accuracy(model, ids, mask, batch_size=3)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            x = ids[b][mask[b] == 1]
            hits = [
                int(model(input_ids=x[None, :t]).logits[0, -1].argmax()) == int(x[t]) for t in range(1, n)
            ]
            assert ma[b].item() == pytest.approx(sum(hits) / (n - 1), abs=1e-12)


def test_memorization_accuracy_errors():
    model = Bigram(P3)
    with pytest.raises(ValueError, match="2-D"):
        M.memorization_accuracy(model, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        M.memorization_accuracy(model, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        M.memorization_accuracy(model, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        M.memorization_accuracy(model, torch.zeros(1, 1, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# extraction likelihood


def test_ngram_overlap_hand_computed():
    gen = torch.tensor([[1, 2, 1, 2, 3], [4, 4, 4, 0, 0]])
    true = torch.tensor([[1, 2, 3, 3, 3], [4, 5, 4, 0, 0]])
    out = _ngram_overlap(gen, true, torch.tensor([5, 3]), 2)
    # Row 0: true bigrams {12, 23, 33}; generated 12, 21, 12, 23 -> 3 found of 4 true bigrams.
    # Row 1 (3 tokens): true bigrams {45, 54}; generated 44, 44 -> 0 of 2.
    assert out.tolist() == [3 / 4, 0.0]


def test_ngram_overlap_vectorised_equals_python_loop():
    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 3):
        gen = torch.randint(0, 3, (40, 12), generator=g)
        true = torch.randint(0, 3, (40, 12), generator=g)
        lengths = torch.randint(n, 13, (40,), generator=g)
        out = _ngram_overlap(gen, true, lengths, n)
        ref = [
            _ngram_overlap_python(gen[r, :k].tolist(), true[r, :k].tolist(), n)
            for r, k in enumerate(lengths.tolist())
        ]
        assert out.tolist() == pytest.approx(ref, abs=1e-15)


def test_extraction_likelihood_hand_computed():
    # x = 0 1 2 2 0 1 (T = 6), n = 2; greedy chain 0 -> 1 -> 2 -> 0.
    # t=1: greedy(0) = 1 2 0 1 2 vs 1 2 2 0 1: gen bigrams 12 20 01 12; true {12, 22, 20, 01} -> 4/4
    # t=2: greedy(0 1) = 2 0 1 2 vs 2 2 0 1: 20 01 12 in {22, 20, 01} -> 2/3
    # t=3: greedy(.. 2) = 0 1 2 vs 2 0 1: 01 12 in {20, 01} -> 1/2
    # t=4: greedy(.. 2) = 0 1 vs 0 1: 1/1
    x = torch.tensor([[0, 1, 2, 2, 0, 1]])
    expected = (1 + 2 / 3 + 1 / 2 + 1) / 4
    for method in ("batched", "naive"):
        el = M.extraction_likelihood(Bigram(P3), x, n=2, method=method)
        assert el.tolist() == [pytest.approx(expected, abs=1e-15)]


def _chain_model(vocab: int, seed: int) -> tuple[Bigram, torch.Tensor]:
    """A random bigram with a clear argmax per row, and sequences that follow its greedy chain except at
    a few positions: the memorised case, where the batched method's divergence sharing matters."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(vocab, vocab, generator=g) + 0.1
    nxt = torch.randperm(vocab, generator=g)
    probs[torch.arange(vocab), nxt] += vocab
    probs /= probs.sum(1, keepdim=True)
    seqs = torch.empty(5, 24, dtype=torch.long)
    for b in range(5):
        seqs[b, 0] = b
        for t in range(1, 24):
            seqs[b, t] = nxt[seqs[b, t - 1]]
            if torch.rand((), generator=g) < 0.15:  # a surprise: the model would not predict this
                seqs[b, t] = torch.randint(0, vocab, (), generator=g)
    return Bigram(probs), seqs


@pytest.mark.parametrize("n", [1, 3, 5])
def test_extraction_likelihood_batched_equals_naive_on_memorised_chain(n):
    model, seqs = _chain_model(vocab=7, seed=n)
    mask = torch.ones_like(seqs)
    mask[1, 18:] = 0
    mask[3, :4] = 0  # left padding on one row
    batched = M.extraction_likelihood(model, seqs, n=n, attention_mask=mask, batch_size=8)
    naive = M.extraction_likelihood(model, seqs, n=n, attention_mask=mask, method="naive")
    assert batched.dtype == torch.float64
    assert torch.equal(batched, naive)  # bit-identical, not merely close
    assert (batched > 0).all()  # the chain is largely memorised: the test is not vacuous


@pytest.mark.parametrize("n", [1, 2, 4])
def test_extraction_likelihood_batched_equals_naive_on_tiny_llama(n):
    model = tiny_llama(6, seed=10 + n).eval()
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 6, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0
    batched = M.extraction_likelihood(model, ids, n=n, attention_mask=mask, batch_size=7)
    naive = M.extraction_likelihood(model, ids, n=n, attention_mask=mask, method="naive", batch_size=2)
    assert torch.equal(batched, naive)


def test_extraction_likelihood_errors():
    model = Bigram(P3)
    x = torch.tensor([[0, 1, 2, 0]])
    with pytest.raises(ValueError, match="at least 5 real tokens"):
        M.extraction_likelihood(model, x, n=4)
    with pytest.raises(ValueError, match="method"):
        M.extraction_likelihood(model, x, n=1, method="fast")
    with pytest.raises(ValueError, match="positive"):
        M.extraction_likelihood(model, x, n=0)
    with pytest.raises(ValueError, match="batch_size"):
        M.extraction_metrics(model, x, n=1, batch_size=0)


class CountingBigram(Bigram):
    """A :class:`Bigram` that records the input width of each forward pass without a KV cache."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__(probs)
        self.full_passes: list[int] = []

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0
    ):
        if not use_cache:
            self.full_passes.append(input_ids.shape[1])
        return super().forward(input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep)


@pytest.mark.parametrize("method", ["batched", "naive"])
def test_extraction_metrics_equal_separate_metrics_with_one_forward_pass(method):
    model, seqs = _chain_model(vocab=7, seed=9)
    mask = torch.ones_like(seqs)
    mask[2, 20:] = 0
    mask[4, :3] = 0
    counting = CountingBigram(model.log_probs.detach().exp())
    ma, el = M.extraction_metrics(counting, seqs, n=3, attention_mask=mask, method=method, batch_size=8)
    assert counting.full_passes == [24]  # one teacher-forced pass for both metrics (5 sequences ≤ 8)
    assert ma.dtype == el.dtype == torch.float64 and ma.device.type == el.device.type == "cpu"
    assert torch.equal(ma, M.memorization_accuracy(model, seqs, mask))
    assert torch.equal(el, M.extraction_likelihood(model, seqs, n=3, attention_mask=mask, method="naive"))


def test_divergence_points_keep_only_the_needed_ones():
    # Sequence 0 (T = 8, n = 3: t runs to 5) misses at s = 2, 4, 6, 7: 6 is the first past 5 and
    # continues prefixes 5; 7 serves no prefix. Sequence 1 (T = 5: t ≤ 2) misses everywhere: 1, 2, 3.
    hits = torch.tensor(
        [[True, False, True, False, True, False, False], [False, False, False, False, False, False, False]]
    )
    assert _divergence_points(hits, [8, 5], 3) == [[2, 4, 6], [1, 2, 3]]
    assert _divergence_points(torch.ones(1, 7, dtype=torch.bool), [8], 3) == [[]]


def test_greedy_decode_left_padding_equals_single_prompts():
    model = tiny_llama(16, seed=7).eval()
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 16, (k,), generator=g) for k in (1, 6, 3)]
    with torch.no_grad():
        batched = M.greedy_decode(model, prompts, 9)
        for r, p in enumerate(prompts):
            seq = p[None]
            for _ in range(9):  # no cache, no padding: the definition
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
            assert batched[r].tolist() == seq[0, len(p) :].tolist()


class OldStyleBigram(Bigram):
    """The pre-5.2x transformers convention: ``past_key_values`` in and out, no ``logits_to_keep``."""

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False
    ):
        return Out(logits=self.log_probs[input_ids], past_key_values=object() if use_cache else None)


def test_greedy_decode_supports_older_calling_convention():
    prompts = [torch.tensor([0, 2]), torch.tensor([1])]
    new = M.greedy_decode(Bigram(P3), prompts, 4)
    old = M.greedy_decode(OldStyleBigram(P3), prompts, 4)
    assert new.tolist() == old.tolist() == [[0, 1, 2, 0], [2, 0, 1, 2]]


def test_greedy_decode_stops_at_eos():
    # From 0 the chain is 1, 2, 0...; with EOS = 2 row 0 stops after "1 2", row 1 at once (then padding).
    out = M.greedy_decode(
        Bigram(P3), [torch.tensor([0]), torch.tensor([1])], 5, eos_token_id=2, pad_token_id=9
    )
    assert out.tolist() == [[1, 2], [2, 9]]  # decoding ends once every row has stopped


def test_greedy_decode_checks_for_eos_every_k_steps_with_the_same_tokens():
    """Checking whether every row has stopped only every k steps (the host synchronisation an
    accelerator pays) changes nothing but the number of padding columns at the end."""
    model = tiny_llama(12, seed=4).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 12, (k,), generator=g) for k in (2, 5, 1, 4)]
    with torch.no_grad():
        free = M.greedy_decode(model, prompts, 30)
        eos = 10  # every row emits it within its first 4 tokens, at different steps
        every = {k: M.greedy_decode(model, prompts, 30, eos_token_id=eos, pad_token_id=11, eos_check_every=k)
                 for k in (1, 3, 8)}  # fmt: skip
    width = every[1].shape[1]
    assert width < 30 and every[8].shape[1] > width  # all stopped early; checking less often costs columns
    for k, out in every.items():
        assert out.shape[1] >= width and out.shape[1] <= min(30, width + k - 1)
        assert torch.equal(out[:, :width], every[1]), k
        assert (out[:, width:] == 11).all(), k  # only padding after every row has stopped
        for r in range(len(prompts)):  # each row: the free continuation up to its first EOS, then padding
            row, ref = out[r].tolist(), free[r].tolist()
            stop = ref.index(eos) + 1 if eos in ref else len(ref)
            assert row[:stop] == ref[:stop] and all(t == 11 for t in row[stop:])
    with pytest.raises(ValueError, match="eos_check_every"):
        M.greedy_decode(model, prompts, 3, eos_token_id=eos, eos_check_every=0)


# --------------------------------------------------------------------------------------------------
# TOFU metrics


def test_truth_ratio_and_normalized_probability_hand_computed():
    true = torch.tensor([0.5, 0.125], dtype=torch.float64)
    pert = torch.tensor([[0.25, 0.0625], [0.5, 0.125]], dtype=torch.float64)
    r = M.truth_ratio(true, pert)
    # geometric means 0.125 and 0.25 -> R = 0.25 and 2
    torch.testing.assert_close(r, torch.tensor([0.25, 2.0], dtype=torch.float64))
    assert M.truth_ratio_score(r) == pytest.approx((0.75 + 0.0) / 2)
    torch.testing.assert_close(
        M.normalized_probability(true, pert), torch.tensor([0.5 / 0.8125, 0.125 / 0.75], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="perturbed"):
        M.truth_ratio(true, pert[:1])


def test_answer_probability_is_length_normalised():
    stats = {"nll_sum": torch.tensor([math.log(8.0), 0.0]), "num_tokens": torch.tensor([3, 2])}
    torch.testing.assert_close(M.answer_probability(stats), torch.tensor([0.5, 1.0], dtype=torch.float64))


def test_rouge_l_recall_hand_computed():
    scores = M.rouge_l_recall(
        ["the cat on mat", "Cats sat", "nothing"], ["the cat sat on the mat", "cat sat", "x y"]
    )
    # LCS "the cat on mat" = 4 of 6 words; stemming maps cats -> cat: 2 of 2; no overlap: 0.
    assert scores == pytest.approx([4 / 6, 1.0, 0.0])
    with pytest.raises(ValueError, match="references"):
        M.rouge_l_recall(["a"], [])


def test_rouge_l_recall_with_remembered_tokens_equals_rouge_score():
    """The scorer remembers each text's tokens (stopping rules score the same references at every
    evaluation): scores equal rouge_score's own stemming scorer, on first and repeated texts."""
    from rouge_score import rouge_scorer

    g = torch.Generator().manual_seed(3)
    words = [
        "the",
        "cats",
        "sat",
        "running",
        "runs",
        "ran",
        "on",
        "mat",
        "Author",
        "born",
        "in",
        "town",
        "Paris",
        "was",
        "3",
        "12",
        "quickly",
    ]
    texts = [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)) for n in range(9)
    ]
    preds, refs = texts + texts[::-1] + texts, texts[::-1] + texts + texts[3:] + texts[:3]
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = [direct.score(r, p)["rougeL"].recall for p, r in zip(preds, refs)]
    assert M.rouge_l_recall(preds, refs) == want
    assert M.rouge_l_recall(preds, refs) == want  # every text remembered now
    assert 0 < sum(want) < len(want)


def test_forget_quality_equals_scipy_and_exact_small_case():
    # Fully separated samples of 3 and 3: D = 1, exact p = 2 / C(6, 3) = 0.1.
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    g = torch.Generator().manual_seed(11)
    a = torch.rand(40, generator=g, dtype=torch.float64) * 2
    b = torch.rand(55, generator=g, dtype=torch.float64) * 1.5
    p = M.forget_quality(a, b)
    assert p == ks_2samp(a.numpy(), b.numpy()).pvalue
    assert M.forget_quality(1 / a, 1 / b) == pytest.approx(p)  # R or TOFU's 1/R: same test
    with pytest.raises(ValueError, match="non-empty"):
        M.forget_quality([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        M.forget_quality([float("nan")], [1.0])


def test_model_utility_harmonic_mean_and_zero_component():
    assert M.model_utility([0.5, 0.25]) == pytest.approx(2 / (2 + 4))
    nine = {f"c{i}": 0.1 * (i + 1) for i in range(9)}
    assert M.model_utility(nine) == pytest.approx(9 / sum(1 / v for v in nine.values()))
    assert M.model_utility({**nine, "c4": 0.0}) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.model_utility([0.5, 1.5])
    with pytest.raises(ValueError, match="at least one"):
        M.model_utility([])
