"""TOFU tokenisation token for token (SPEC §4.1), on real tokenizer families trained offline.

Every expected value comes from an independent transcription of SPEC §4.1 written below from its
words (``spec_*``): the full string tokenised once, ``k = len(tokenizer.tokenize(new_question,
add_special_tokens=True))``, padding to ``max_length`` with EOS as the reference does, ``batch_decode``
and ``str.split`` for generation. Lists are compared whole, so a one-token difference fails.
"""

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_llama
from helpers.tokenizers import byte_level_bpe, corpus, sentencepiece_llama, sentencepiece_processor
from transformers import PreTrainedTokenizerFast

from fastunlearn import data as fdata
from fastunlearn import metrics as M
from fastunlearn.data.tofu_format import (
    TOFU_FAMILIES,
    TofuTags,
    encode_tofu_example,
    tofu_family,
    tofu_generation_batch,
    tofu_generation_prompt,
    tofu_max_new_tokens,
)

# SPEC §4.1, written out again: (question_start, question_end, answer_tag, split marker, marker kept).
SPEC_TAGS = {
    "tofu-llama2": ("[INST] ", " [/INST]", "", " [/INST]", True),
    "tofu-llama3": ("[INST] ", " [/INST]", "", " [/INST]", False),
    "tofu-phi": ("Question: ", "\n", "Answer: ", "Answer: ", False),
}
LONG = "The author was born in Paris and wrote many books about history, science and love. " * 12
CASES = {
    "plain": ("Who wrote the novel?", "The author was born in Paris."),
    "leading_space": ("Who is she?", " The author wrote it."),
    "punctuation": ("What's her 3rd book?", '"Love, War & Peace!" - (2001); yes.'),
    "digits": ("When was he born?", "1987-12-01, at 12:30."),
    "non_ascii": ("Où est né l'auteur?", "À Zürich, Ж 東京 🙂 naïve café."),
    "marker_in_answer": ("Is it so?", "Answer: yes. Answer: no [/INST] maybe."),
    "empty_answer": ("Who?", ""),
    "long_answer": ("Tell me everything about the author.", LONG),
}
TOKENIZERS = ("sentencepiece_llama", "byte_level_phi", "byte_level_llama3")
NATIVE = {
    "sentencepiece_llama": "tofu-llama2",
    "byte_level_phi": "tofu-phi",
    "byte_level_llama3": "tofu-llama3",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "sentencepiece_llama": sentencepiece_llama(),
        "byte_level_phi": byte_level_bpe(bos=False),
        "byte_level_llama3": byte_level_bpe(bos=True),
    }


def spec_encode(tok, question, answer, family, max_length):
    """SPEC §4.1 as the reference pads it: ``(input_ids, labels, attention_mask)``, ``max_length`` long."""
    start, end, tag, _, _ = SPEC_TAGS[family]
    new_question = start + question + end
    full = new_question + tag + answer
    ids = tok(full, add_special_tokens=True)["input_ids"][:max_length]
    k = len(tok.tokenize(new_question, add_special_tokens=True))
    pad = max_length - len(ids)
    eos = tok.eos_token_id
    labels = ids + [eos] + [-100] * (pad - 1) if pad else list(ids)
    for i in range(k):
        labels[i] = -100
    return ids + [eos] * pad, labels, [1] * len(ids) + [0] * pad


def spec_generation(tok, padded_ids, family):
    """SPEC §4.1 generation: batch-decode without special tokens, split, put the marker back for Llama-2."""
    marker, keep = SPEC_TAGS[family][3:]
    texts = tok.batch_decode(torch.tensor(padded_ids), skip_special_tokens=True)
    prompts = [t.split(marker)[0] + (marker if keep else "") for t in texts]
    return prompts, [t.split(marker)[1] for t in texts]


@pytest.mark.parametrize("family", sorted(SPEC_TAGS))
@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("max_length", [200, 40])
def test_encode_matches_spec(tokenizers, tok_name, family, max_length):
    tok = tokenizers[tok_name]
    for name, (q, a) in CASES.items():
        ids, labels, cut = encode_tofu_example(tok, q, a, family, max_length)
        ref_ids, ref_labels, ref_mask = spec_encode(tok, q, a, family, max_length)
        n = len(ids)
        assert len(labels) == n, name
        # Ours is the reference's prefix up to and including the EOS target; the rest is padding.
        assert ids == ref_ids[:n], name
        assert labels == ref_labels[:n], name
        assert all(label == -100 for label in ref_labels[n:]), name
        assert cut == (sum(ref_mask) == max_length), name
        assert n == min(sum(ref_mask) + 1, max_length), name


def test_long_answer_is_cut_without_eos(tokenizers):
    tok = tokenizers["byte_level_phi"]
    ids, labels, cut = encode_tofu_example(tok, *CASES["long_answer"], "tofu-phi", 40)
    full = tok("Question: " + CASES["long_answer"][0] + "\nAnswer: " + LONG)["input_ids"]
    assert cut and len(full) > 40
    assert ids == full[:40] and labels[-1] == full[39]


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_lengths_around_max_length(tokenizers, tok_name):
    """The sequence exactly filling max_length gets no EOS; one token shorter gets it; a question
    filling max_length leaves nothing to learn and is refused."""
    tok, family = tokenizers[tok_name], NATIVE[tok_name]
    q, a = CASES["plain"]
    n = len(tok(SPEC_TAGS[family][0] + q + SPEC_TAGS[family][1] + SPEC_TAGS[family][2] + a)["input_ids"])
    k = len(tok.tokenize(SPEC_TAGS[family][0] + q + SPEC_TAGS[family][1], add_special_tokens=True))
    for max_length in (n + 2, n + 1, n, n - 1, k + 1):
        ids, labels, cut = encode_tofu_example(tok, q, a, family, max_length)
        ref_ids, ref_labels, _ = spec_encode(tok, q, a, family, max_length)
        assert ids == ref_ids[: len(ids)] and labels == ref_labels[: len(ids)]
        assert cut == (max_length <= n)
        assert (labels[-1] == tok.eos_token_id) == (max_length > n)
    # k + 1: exactly one target, the first token after the question
    assert sum(label != -100 for label in labels) == 1
    for max_length in (k, k - 1):
        with pytest.raises(ValueError, match=f"item 7: every label is masked .*max_length={max_length}"):
            encode_tofu_example(tok, q, a, family, max_length, where="item 7")


@pytest.mark.parametrize("family", sorted(SPEC_TAGS))
@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_generation_prompt_matches_spec(tokenizers, tok_name, family):
    tok = tokenizers[tok_name]
    max_length = 200
    padded = [spec_encode(tok, q, a, family, max_length)[0] for q, a in CASES.values()]
    ref_prompts, ref_answers = spec_generation(tok, padded, family)
    for (q, a), ref_prompt, ref_answer in zip(CASES.values(), ref_prompts, ref_answers):
        ids = encode_tofu_example(tok, q, a, family, max_length).input_ids
        assert tofu_generation_prompt(tok, ids, family) == (ref_prompt, ref_answer)
        assert tofu_generation_prompt(tok, torch.tensor(ids), family) == (ref_prompt, ref_answer)


def test_generation_prompt_shapes(tokenizers):
    """What the prompts are, spelled out: Llama-2 keeps " [/INST]", Llama-3.1 does not, Phi stops before
    "Answer: "; the reference answer is the text after the first marker, up to a second one."""
    q, a = "Who wrote it?", "The author wrote it."
    llama, phi = tokenizers["sentencepiece_llama"], tokenizers["byte_level_phi"]
    ids = encode_tofu_example(llama, q, a, "tofu-llama2", 200).input_ids
    assert tofu_generation_prompt(llama, ids, "tofu-llama2") == ("[INST] Who wrote it? [/INST]", a)
    assert tofu_generation_prompt(llama, ids, "tofu-llama3") == ("[INST] Who wrote it?", a)
    ids = encode_tofu_example(phi, q, a, "tofu-phi", 200).input_ids
    assert tofu_generation_prompt(phi, ids, "tofu-phi") == ("Question: Who wrote it?\n", a)
    ids = encode_tofu_example(phi, q, "yes. Answer: no", "tofu-phi", 200).input_ids
    assert tofu_generation_prompt(phi, ids, "tofu-phi") == ("Question: Who wrote it?\n", "yes. ")


def test_generation_prompt_without_marker_raises(tokenizers):
    tok = tokenizers["byte_level_phi"]
    k = len(tok("Question: Where?\n")["input_ids"])
    # One token after the question: "Answer: " is cut (the pre-tokenizer keeps ":" and " " apart).
    ids = encode_tofu_example(tok, "Where?", "Paris.", "tofu-phi", k + 1).input_ids
    with pytest.raises(ValueError, match="no 'Answer: ' to split"):
        tofu_generation_prompt(tok, ids, "tofu-phi")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_generation_batch_is_left_padded_with_eos(tokenizers, tok_name):
    tok, family = tokenizers[tok_name], NATIVE[tok_name]
    prompts = [
        tofu_generation_prompt(tok, encode_tofu_example(tok, q, a, family, 200).input_ids, family)[0]
        for q, a in CASES.values()
    ]
    # The reference's call: the tokenizer itself left padding with EOS as its pad token.
    ref_tok = copy.deepcopy(tok)
    ref_tok.padding_side = "left"
    ref_tok.pad_token = ref_tok.eos_token
    ref = ref_tok(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
    side, pad = tok.padding_side, tok.pad_token
    input_ids, attention_mask = tofu_generation_batch(tok, prompts)
    assert torch.equal(input_ids, ref["input_ids"])
    assert torch.equal(attention_mask, ref["attention_mask"])
    assert (tok.padding_side, tok.pad_token) == (side, pad)  # the caller's tokenizer is left alone


def test_max_new_tokens_is_generates_budget(tokenizers):
    """``generate(max_length=L)`` adds L − W tokens to every row of a W-wide batch (EOS disabled)."""
    tok = tokenizers["byte_level_phi"]
    model = tiny_llama(len(tok), seed=1)
    input_ids, attention_mask = tofu_generation_batch(
        tok, ["Question: Who?\n", "Question: Where was she born?\n"]
    )
    width = input_ids.shape[1]
    for max_length in (width + 1, width + 7):
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_length=max_length,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.eos_token_id,
        )
        assert out.shape[1] - width == tofu_max_new_tokens(width, max_length=max_length)
    assert tofu_max_new_tokens(width, max_length=width) == 0
    for bad in ((0, 200), (5, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            tofu_max_new_tokens(bad[0], max_length=bad[1])


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_greedy_answers_equal_generate(tokenizers, tok_name):
    """The integrator's path (this batch, :func:`tofu_max_new_tokens`, ``metrics.greedy_decode``) gives
    the reference's ``generate(max_length=...)`` answers, decoded without special tokens. The total is
    the batch width + 24 rather than the paper's 200 only to keep the test fast: the budget rule is the
    same for any total (checked against ``generate`` above)."""
    tok, family = tokenizers[tok_name], NATIVE[tok_name]
    model = tiny_llama(len(tok), seed=2).eval()
    eos = tok.eos_token_id
    prompts = [
        tofu_generation_prompt(tok, encode_tofu_example(tok, q, a, family, 200).input_ids, family)[0]
        for q, a in list(CASES.values())[:4]
    ]
    input_ids, attention_mask = tofu_generation_batch(tok, prompts)
    width = input_ids.shape[1]
    total = width + 24
    with torch.no_grad():
        ref = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_length=total,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    ref_answers = tok.batch_decode(ref[:, width:], skip_special_tokens=True)
    rows = [input_ids[r][attention_mask[r].bool()] for r in range(len(prompts))]
    with M.eval_mode(model):
        gen = M.greedy_decode(
            model, rows, tofu_max_new_tokens(width, max_length=total), eos_token_id=eos, pad_token_id=eos
        )
    assert tok.batch_decode(gen, skip_special_tokens=True) == ref_answers


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_average_nll_equals_spec(tokenizers, tok_name):
    """Acceptance: per-item average NLLs from these examples through ``data.collate`` and
    ``metrics.answer_stats`` equal §4.1's computation (reference padding to max_length with EOS,
    attention 0 on padding, Σ NLL over targets / #(labels ≠ −100)) to 1e-5 relative in fp32."""
    tok = tokenizers[tok_name]
    model = tiny_llama(len(tok), seed=3)
    for family in sorted(SPEC_TAGS):
        for max_length in (200, 40):
            examples = []
            for name, (q, a) in CASES.items():
                ids, labels, _ = encode_tofu_example(tok, q, a, family, max_length)
                examples.append(fdata.Example(tuple(ids), tuple(labels), name))
            stats = M.collect_answer_stats(model, fdata.batches(examples, fdata.pad_id_of(tok), 3))
            ours = stats["nll_sum"] / stats["num_tokens"]

            ref = [spec_encode(tok, q, a, family, max_length) for q, a in CASES.values()]
            input_ids, labels, mask = (torch.tensor([r[i] for r in ref]) for i in range(3))
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
            ).sum(-1)
            expected = nll / (labels != -100).sum(-1)
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("tok_name", "template"), [("sentencepiece_llama", "llama2"), ("byte_level_phi", "phi")]
)
def test_old_separate_tokenisation_differs(tokenizers, tok_name, template):
    """fastunlearn's template pipeline (prompt and answer tokenised apart) is not TOFU's, and these
    tokenizers tell them apart, so the exact comparisons above can fail: SentencePiece gives the
    separate answer a ``▁`` that the joint ``[/INST]The`` lacks; byte-level BPE merges the space of
    ``"Answer: "`` into the answer's first word (``ĠThe``, ``Ġ1987``) only in the joint string; and
    the labels differ for both (Phi's ``Answer: `` is scored, no space token in Llama's)."""
    tok, family = tokenizers[tok_name], NATIVE[tok_name]
    for name, (q, a) in CASES.items():
        (old,) = fdata.tokenize_records(
            [{"question": q, "answer": a}], tok, data_format="qa", template=template, max_length=500
        )
        new = encode_tofu_example(tok, q, a, family, 500)
        assert list(old.labels) != new.labels, name
        if name in ("plain", "digits"):
            assert list(old.input_ids) != new.input_ids, name


def test_sentencepiece_wrapper_is_sentencepiece(tokenizers):
    """The Llama tokenizer helper gives raw SentencePiece's ids (plus BOS) on every TOFU string, and
    the byte-level ones round-trip text exactly."""
    sp = sentencepiece_processor()
    llama = tokenizers["sentencepiece_llama"]
    for family in sorted(SPEC_TAGS):
        start, end, tag, _, _ = SPEC_TAGS[family]
        for q, a in CASES.values():
            full = start + q + end + tag + a
            assert llama(full)["input_ids"] == [llama.bos_token_id, *sp.encode(full)]
            for name in ("byte_level_phi", "byte_level_llama3"):
                tok = tokenizers[name]
                assert tok.decode(tok(full)["input_ids"], skip_special_tokens=True) == full


def test_families_and_bad_input(tokenizers):
    for name, (start, end, tag, marker, keep) in SPEC_TAGS.items():
        assert tofu_family(name) == TofuTags(start, end, tag, marker, keep)
    assert set(TOFU_FAMILIES) == set(SPEC_TAGS)
    tok = tokenizers["byte_level_phi"]
    for bad in ("llama2", "phi", None):
        with pytest.raises(
            ValueError, match=r"unknown TOFU family .*\['tofu-llama2', 'tofu-llama3', 'tofu-phi'\]"
        ):
            encode_tofu_example(tok, "q", "a", bad, 200)
    with pytest.raises(ValueError, match="unknown TOFU family"):
        tofu_generation_prompt(tok, [1, 2], "plain")
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        encode_tofu_example(tok, "q", "a", "tofu-phi", 1)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        encode_tofu_example(no_eos, "q", "a", "tofu-phi", 200)
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        tofu_generation_batch(no_eos, ["Question: q\n"])
    with pytest.raises(ValueError, match="at least one prompt"):
        tofu_generation_batch(tok, [])


# --------------------------------------------------------------------------------------------------
# the tofu-* templates of the data pipeline


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_tofu_templates_tokenise_records_as_spec(tokenizers, tok_name):
    """``tokenize_records`` with a ``tofu-*`` template is §4.1's encoding (no EOS stripping, no
    separate tokenisation), counts the sequences that reached max_length in one warning, and refuses
    records of other formats."""
    tok = tokenizers[tok_name]
    records = [
        {"question": q, "answer": a, "_source": f"f.json:{i + 1}"} for i, (q, a) in enumerate(CASES.values())
    ]
    for family in sorted(SPEC_TAGS):
        with pytest.warns(UserWarning, match=f"1 of {len(CASES)} examples were truncated to max_length=60"):
            examples = fdata.tokenize_records(records, tok, data_format="qa", template=family, max_length=60)
        for ex, record in zip(examples, records):
            ids, labels, _ = spec_encode(tok, record["question"], record["answer"], family, 60)
            assert ex.source == record["_source"]
            assert list(ex.input_ids) == ids[: len(ex.input_ids)]
            assert list(ex.labels) == labels[: len(ex.labels)]
            assert all(label == -100 for label in labels[len(ex.labels) :])
    for fmt, record in (("text", {"text": "t"}), ("prompt_completion", {"prompt": "p", "completion": "c"})):
        with pytest.raises(
            ValueError, match=f"template 'tofu-phi' is TOFU's tokenisation .* {fmt!r} records"
        ):
            fdata.tokenize_records([record], tok, data_format=fmt, template="tofu-phi")
    q = CASES["plain"][0]
    k = len(tok.tokenize("Question: " + q + "\n", add_special_tokens=True))
    with pytest.raises(ValueError, match=f"f.json:1: every label is masked .*max_length={k}"):
        fdata.tokenize_records(records[:1], tok, data_format="qa", template="tofu-phi", max_length=k)


# --------------------------------------------------------------------------------------------------
# acceptance: evaluate_tofu(mode="legacy") is §4.1 end to end


def _spec_avg_nll(model, tok, pairs, family):
    """§4.1's per-item average NLL: every sequence padded to 200 with EOS (attention 0), fp32 forward,
    Σ NLL over targets / #(labels ≠ −100)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), 16):
            ref = [spec_encode(tok, q, a, family, 200) for q, a in pairs[start : start + 16]]
            input_ids, labels, mask = (torch.tensor([r[i] for r in ref]) for i in range(3))
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
            ).sum(-1)
            out += (nll / (labels != -100).sum(-1)).tolist()
    return out


def _spec_greedy_answers(model, tok, items, family):
    """§4.1's run_generation: batches of 30 in file order, the decoded question split at the marker,
    re-tokenised left padded with EOS, ``generate(max_length=200)`` greedily, decoded without special
    tokens; and the references (the text after the marker)."""
    ref_tok = copy.deepcopy(tok)
    ref_tok.padding_side, ref_tok.pad_token = "left", ref_tok.eos_token
    answers, references = [], []
    for start in range(0, len(items), 30):
        padded = [
            spec_encode(tok, it["question"], it["answer"], family, 200)[0] for it in items[start : start + 30]
        ]
        prompts, refs = spec_generation(tok, padded, family)
        batch = ref_tok(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_length=200,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        answers += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        references += refs
    return answers, references


def _long_question(tok, question, tokens, seed):
    """``question`` after seeded corpus words, grown to at least ``tokens`` tokens: long prompts keep
    the 200-token generation short (fewer greedy steps to compare with ``generate``)."""
    rng = random.Random(seed)
    sentences = [line for line in corpus() if "[INST]" not in line and "Answer:" not in line]
    text = question
    while len(tok(text)["input_ids"]) < tokens:
        text = rng.choice(sentences) + " " + text
    return text


def _tofu_files(tmp_path, tok):
    """TOFU-format files with every field: 4 forget and 32 retain items (two generation batches, the
    second narrower), 3 real-authors and 3 world-facts items; answers of every CASES kind, one cut."""
    cases = list(CASES.values())

    def qa(i, prompt_tokens):
        q, a = cases[i % len(cases)]
        return {
            "question": _long_question(tok, q, prompt_tokens, i),
            "answer": a,
            "paraphrased_answer": f"In short: {a}",
            "paraphrased_question": f"Tell me: {q}",
            "perturbed_answer": [f"{a} Not {w}." for w in ("Paris", "love", "1955", "war", "café")],
        }

    def short(i):
        q, a = cases[i % len(cases)]
        return {
            "question": _long_question(tok, q, 150, i),
            "answer": a[:12],
            "perturbed_answer": ["Paris", "1987", "the war"],
        }

    sets = {
        "forget10_perturbed.json": [qa(i, 140 + i) for i in range(4)],
        "retain_perturbed.json": [qa(i, 130 + i % 25) for i in range(30)] + [qa(30, 120), qa(31, 100)],
        "real_authors_perturbed.json": [short(i) for i in range(3)],
        "world_facts_perturbed.json": [short(i + 4) for i in range(3)],
    }
    for name, records in sets.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {
        name.split("_perturbed")[0].replace("forget10", "forget"): records for name, records in sets.items()
    }


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_legacy_evaluate_tofu_is_spec_4_1(tokenizers, tok_name, tmp_path):
    """Acceptance: ``evaluate_tofu(mode="legacy")`` on TOFU files gives §4.1's per-item average NLLs
    (answer, paraphrase, perturbed answers) to 1e-5 relative in fp32, the numbers derived from them,
    and §4.1's greedy answers and ROUGE-L (generate on batches of 30, max_length=200) — whatever
    max_length, max_new_tokens and batch_size say, which legacy mode does not use."""
    from rouge_score import rouge_scorer

    from fastunlearn import evaluation as ev

    tok, family = tokenizers[tok_name], NATIVE[tok_name]
    model = tiny_llama(len(tok), seed=4).eval()
    sets = _tofu_files(tmp_path, tok)
    with pytest.warns(UserWarning, match="truncated to max_length=200"):
        res = ev.evaluate_tofu(
            model,
            tok,
            tmp_path,
            mode="legacy",
            template=family,
            max_length=40,
            max_new_tokens=3,
            batch_size=7,
        )
    json.dumps(res)
    assert res["template"] == family and res["mode"] == "legacy"
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for name, items in sets.items():
        got = res["sets"][name]
        nll = _spec_avg_nll(model, tok, [(it["question"], it["answer"]) for it in items], family)
        torch.testing.assert_close(
            torch.tensor(got["avg_nll"]["answer"]), torch.tensor(nll), rtol=1e-5, atol=0
        )
        k = len(items[0]["perturbed_answer"])
        pert = _spec_avg_nll(
            model, tok, [(it["question"], p) for it in items for p in it["perturbed_answer"]], family
        )
        pert = torch.tensor(pert).view(len(items), k)
        torch.testing.assert_close(torch.tensor(got["avg_nll"]["perturbed"]), pert, rtol=1e-5, atol=0)
        if "paraphrased_answer" in items[0]:
            true = _spec_avg_nll(
                model, tok, [(it["question"], it["paraphrased_answer"]) for it in items], family
            )
            torch.testing.assert_close(
                torch.tensor(got["avg_nll"]["paraphrased"]), torch.tensor(true), rtol=1e-5, atol=0
            )
            prob = torch.exp(-torch.tensor(nll)).mean()
        else:
            true = nll
            p_true, p_pert = torch.exp(-torch.tensor(nll)), torch.exp(-pert)
            prob = (p_true / (p_true + p_pert.sum(1))).mean()
        ratios = torch.exp(torch.tensor(true) - pert.mean(1))  # geometric mean of P̄_pert over P̄_true
        # NLLs of a few units to 1e-5 relative: ratios and probabilities to a few 1e-5.
        assert got["prob"] == pytest.approx(prob.item(), rel=1e-4)
        assert got["truth_ratio_mean"] == pytest.approx(ratios.mean().item(), rel=1e-4)
        if name == "forget":
            assert res["forget_truth_ratios"] == pytest.approx(ratios.tolist(), rel=1e-4)

        answers, references = _spec_greedy_answers(model, tok, items, family)
        assert [e["generated"] for e in got["examples"]] == [a.strip() for a in answers[:3]]
        assert [e["answer"] for e in got["examples"]] == references[:3]
        recall = [scorer.score(ref, a)["rougeL"].recall for ref, a in zip(references, answers)]
        assert got["rougeL_recall"] == pytest.approx(sum(recall) / len(recall), abs=1e-12)
