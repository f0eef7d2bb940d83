"""Tests of fastunlearn.evaluation: TOFU file parsing (every file kind), the TOFU protocol against an
independent fp64 per-item computation, forget-quality references, the extraction protocol, the
``fastunlearn eval`` command, and the trainer callbacks (with a real transformers.Trainer)."""

import argparse
import copy
import json
import math

import pytest
import torch
from helpers.models import tiny_llama
from scipy.stats import ks_2samp

from fastunlearn import data as fdata
from fastunlearn import evaluation as ev
from fastunlearn import metrics as M
from fastunlearn.evaluation.tofu_scoring import _generation_prompts, _greedy_answers

pytestmark = pytest.mark.usefixtures("one_thread")


def _qa(i, k=None, para=True):
    # Questions of different lengths: generation sorts prompts by length, and the tests check that the
    # answers come back in the items' order.
    question = f"Where was author {i} born" + " in the old days" * (i % 3) + "?"
    rec = {"question": question, "answer": f"Author {i} was born in town {i}."}
    if para:
        rec["paraphrased_answer"] = f"The birthplace of author {i} is town {i}."
        rec["paraphrased_question"] = f"In which town was author {i} born?"
    if k:
        rec["perturbed_answer"] = [f"The birthplace of author {i} is town {i + j + 1}." for j in range(k)]
    return rec


def _short(i, k):  # real authors / world facts: short answers, 3 perturbed, no paraphrase
    return {
        "question": f"What is the capital of land {i}?",
        "answer": f"City {i}",
        "perturbed_answer": [f"City {i + j + 7}" for j in range(k)],
    }


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tofu_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tofu")
    _write(d / "forget10_perturbed.json", [_qa(i, 5) for i in range(4)])
    _write(d / "forget10.json", [_qa(i, para=False) for i in range(4)])
    _write(d / "retain_perturbed.json", [_qa(i, 5) for i in range(10, 14)])
    _write(d / "real_authors_perturbed.json", [_short(i, 3) for i in range(3)])
    _write(d / "world_facts_perturbed.json", [_short(i, 3) for i in range(20, 23)])
    return d


@pytest.fixture(scope="module")
def model_and_tokenizer(tofu_dir):
    from fastunlearn.demo import train_tokenizer

    texts = [line for f in sorted(tofu_dir.iterdir()) for line in f.read_text().splitlines()]
    tok = train_tokenizer(texts, 300)
    model = tiny_llama(
        len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model.eval(), tok


@pytest.fixture(scope="module")
def trained_model_and_tokenizer(model_and_tokenizer, tofu_dir):
    """The tiny model trained (``phi`` template) on every answer and paraphrase of the evaluation files:
    its greedy answers reproduce some answers (ROUGE-L recall > 0) and it prefers the truth over the
    perturbed answers (truth-ratio score > 0), so all nine utility numbers are non-zero."""
    model, tok = model_and_tokenizer
    model = copy.deepcopy(model).train()
    records = []
    for path in sorted(tofu_dir.glob("*_perturbed.json")):
        for it in ev.read_tofu_file(path):
            records += [
                {"question": it.question, "answer": a} for a in (it.answer, it.paraphrased_answer) if a
            ]
    batch = fdata.collate(fdata.tokenize_records(records, tok, data_format="qa", template="phi"), 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


# --------------------------------------------------------------------------------------------------
# parsing


def test_read_every_tofu_file_kind(tofu_dir):
    forget = ev.read_tofu_file(tofu_dir / "forget10_perturbed.json")
    assert len(forget) == 4 and len(forget[0].perturbed_answers) == 5
    assert forget[1].paraphrased_answer == "The birthplace of author 1 is town 1."
    assert forget[0].source.endswith("forget10_perturbed.json:1")
    retain = ev.read_tofu_file(tofu_dir / "retain_perturbed.json")
    assert [len(it.perturbed_answers) for it in retain] == [5] * 4
    for name in ("real_authors_perturbed.json", "world_facts_perturbed.json"):
        items = ev.read_tofu_file(tofu_dir / name)
        assert len(items) == 3 and all(len(it.perturbed_answers) == 3 for it in items)
        assert all(it.paraphrased_answer is None for it in items)
    plain = ev.read_tofu_file(tofu_dir / "forget10.json")
    assert plain[2].answer == "Author 2 was born in town 2."
    assert plain[2].perturbed_answers is None and plain[2].paraphrased_answer is None


def test_read_tofu_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_qa(0, 5)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.json:2: invalid JSON"):
        ev.read_tofu_file(bad)
    _write(bad, [_qa(0, 5), _qa(1, 3)])
    with pytest.raises(ValueError, match=r"bad.json:2: 3 perturbed answers"):
        ev.read_tofu_file(bad)
    _write(bad, [{**_qa(0), "perturbed_answer": []}])
    with pytest.raises(ValueError, match="non-empty list"):
        ev.read_tofu_file(bad)
    _write(bad, [{"question": "q?"}])
    with pytest.raises(ValueError, match="'answer'"):
        ev.read_tofu_file(bad)
    with pytest.raises(FileNotFoundError):
        ev.read_tofu_file(tmp_path / "missing.json")


def test_find_tofu_files(tofu_dir, tmp_path):
    files = ev.find_tofu_files(tofu_dir)
    assert {k: v.rsplit("/", 1)[1] for k, v in files.items()} == {
        "forget": "forget10_perturbed.json",
        "retain": "retain_perturbed.json",
        "real_authors": "real_authors_perturbed.json",
        "world_facts": "world_facts_perturbed.json",
    }
    _write(tmp_path / "forget01_perturbed.json", [_qa(0, 5)])
    _write(tmp_path / "forget05_perturbed.json", [_qa(0, 5)])
    with pytest.raises(ValueError, match="several forget files"):
        ev.find_tofu_files(tmp_path)
    assert ev.find_tofu_files(tmp_path, forget_split="forget05")["forget"].endswith("forget05_perturbed.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no TOFU files"):
        ev.find_tofu_files(tmp_path / "empty")


def test_a_forget_split_that_is_not_there_is_an_error_listing_the_splits(tofu_dir, tmp_path):
    # It used to drop the forget set silently (and with it forget quality).
    with pytest.raises(ValueError, match=r"no forget split 'forget01' in .*; splits found: \['forget10'\]"):
        ev.find_tofu_files(tofu_dir, forget_split="forget01")
    with pytest.raises(ValueError, match=r"splits found: none"):
        ev.find_tofu_files(tmp_path, forget_split="forget10")


def test_a_set_without_perturbed_answers_says_which_file_is_missing(model_and_tokenizer, tofu_dir, tmp_path):
    model, tok = model_and_tokenizer
    alone = tmp_path / "forget10.json"
    alone.write_text((tofu_dir / "forget10.json").read_text())
    for path, state in ((tofu_dir / "forget10.json", "use it instead"), (alone, "not found")):
        res = ev.evaluate_tofu(model, tok, {"forget": path}, generate=False, template="phi")
        reason = res["sets"]["forget"]["missing"]["truth_ratio"]
        assert reason == (
            f"{path} has no perturbed_answer field (TOFU keeps them in forget10_perturbed.json: {state})"
        )
        assert f"forget truth_ratio missing: {reason}" in ev.format_table({"tofu": res})
    res = ev.evaluate_tofu(model, tok, {"forget": tofu_dir / "forget10_perturbed.json"}, generate=False)
    assert "missing" not in res["sets"]["forget"]


# --------------------------------------------------------------------------------------------------
# the TOFU protocol


def _ref_stats(model64, tok, question, answer, template):
    """(P̄(answer | question), #argmax hits, #answer tokens) by definition: one example, fp64, explicit
    loop over the answer tokens."""
    (ex,) = fdata.tokenize_records(
        [{"question": question, "answer": answer}], tok, data_format="qa", template=template
    )
    ids = torch.tensor([ex.input_ids])
    logp = torch.log_softmax(model64(input_ids=ids).logits[0].double(), dim=-1)
    positions = [t for t in range(1, len(ex.labels)) if ex.labels[t] != -100]
    terms = [logp[t - 1, ex.input_ids[t]].item() for t in positions]
    hits = sum(int(logp[t - 1].argmax()) == ex.input_ids[t] for t in positions)
    return math.exp(sum(terms) / len(terms)), hits, len(positions)


def _ref_prob(model64, tok, question, answer, template):
    return _ref_stats(model64, tok, question, answer, template)[0]


def _ref_greedy_answer(model, tok, question, max_new_tokens):
    """Greedy answer by definition: the ``phi`` prompt written out, one sequence, no cache, stop at EOS."""
    seq = torch.tensor([tok(f"Question: {question}\nAnswer: ")["input_ids"]])
    generated = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=seq).logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        generated.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return tok.decode(generated, skip_special_tokens=True).strip()


def test_evaluate_tofu_matches_per_item_definition(trained_model_and_tokenizer, tofu_dir):
    from rouge_score import rouge_scorer

    model, tok = trained_model_and_tokenizer
    # batch_size 3 < set sizes, prompts of several lengths: generation batches items out of order.
    res = ev.evaluate_tofu(model, tok, tofu_dir, template="phi", batch_size=3, max_new_tokens=16)
    json.dumps(res)  # JSON-serialisable
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    model64 = copy.deepcopy(model).double()
    ratios = {}
    with torch.no_grad():
        for name, fname in (
            ("forget", "forget10_perturbed.json"),
            ("retain", "retain_perturbed.json"),
            ("real_authors", "real_authors_perturbed.json"),
            ("world_facts", "world_facts_perturbed.json"),
        ):
            items = ev.read_tofu_file(tofu_dir / fname)
            answer_stats = [_ref_stats(model64, tok, it.question, it.answer, "phi") for it in items]
            p = [a[0] for a in answer_stats]
            true = [
                _ref_prob(model64, tok, it.question, it.paraphrased_answer or it.answer, "phi")
                for it in items
            ]
            pert = [
                [_ref_prob(model64, tok, it.question, a, "phi") for a in it.perturbed_answers] for it in items
            ]
            r = [math.exp(sum(math.log(x) for x in pp) / len(pp)) / t for t, pp in zip(true, pert)]
            ratios[name] = r
            s = res["sets"][name]
            assert s["num_items"] == len(items)
            if name in ("real_authors", "world_facts"):
                ref_prob = sum(pi / (pi + sum(pp)) for pi, pp in zip(p, pert)) / len(items)
            else:
                ref_prob = sum(p) / len(p)
            # fp32 model against its fp64 copy: ~1e-6 relative per probability.
            assert s["prob"] == pytest.approx(ref_prob, rel=1e-5)
            assert s["accuracy"] == sum(a[1] for a in answer_stats) / sum(a[2] for a in answer_stats)
            assert s["truth_ratio_mean"] == pytest.approx(sum(r) / len(r), rel=1e-5)
            assert s["truth_ratio"] == pytest.approx(
                sum(max(0, 1 - x) for x in r) / len(r), rel=1e-5, abs=1e-7
            )
            preds = [_ref_greedy_answer(model, tok, it.question, 16) for it in items]
            recalls = [scorer.score(it.answer, p)["rougeL"].recall for it, p in zip(items, preds)]
            assert [e["generated"] for e in s["examples"]] == preds[:3]
            assert s["rougeL_recall"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-12)
    assert res["forget_truth_ratios"] == pytest.approx(ratios["forget"], rel=1e-5)
    sets = res["sets"]
    nine = [sets[name][metric] for name in ("retain", "real_authors", "world_facts")
            for metric in ("prob", "rougeL_recall", "truth_ratio")]  # fmt: skip
    assert all(0 < x <= 1 for x in nine)  # the trained model makes every term count
    assert 0 < sets["retain"]["rougeL_recall"] < 1  # some answers reproduced, not all
    assert res["model_utility"] == pytest.approx(9 / sum(1 / x for x in nine), rel=1e-12)
    assert len(res["model_utility_components"]) == 9 and res["model_utility_partial"] is None
    assert res["forget_quality"] is None
    table = ev.format_table({"tofu": res})
    assert "(harmonic mean of all 9 numbers)" in table and "partial" not in table


def test_forget_quality_reference_roundtrip_and_errors(model_and_tokenizer, tofu_dir, tmp_path):
    model, tok = model_and_tokenizer
    ref_path = tmp_path / "ref.json"
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="save-reference"):
        ev.evaluate_tofu(model, tok, tofu_dir, reference_truth_ratios=missing, generate=False)
    sets = {"forget": tofu_dir / "forget10_perturbed.json"}
    first = ev.evaluate_tofu(model, tok, sets, generate=False, save_reference=ref_path)
    assert ev.load_reference_truth_ratios(ref_path) == pytest.approx(first["forget_truth_ratios"])
    saved = ev.load_reference_truth_ratios(
        ref_path, mode="full", template="plain", forget_file=sets["forget"]
    )
    assert saved == pytest.approx(first["forget_truth_ratios"])
    # Every check below runs before the model does: model=None would fail at its first use.
    with pytest.raises(FileExistsError):
        ev.evaluate_tofu(None, tok, sets, generate=False, save_reference=ref_path)
    with pytest.raises(ValueError, match=r"computed with template 'plain'.*uses template 'phi'"):
        ev.evaluate_tofu(None, tok, sets, template="phi", reference_truth_ratios=ref_path)
    with pytest.raises(ValueError, match=r"computed with mode 'full'.*uses mode 'legacy'"):
        ev.evaluate_tofu(None, tok, sets, mode="legacy", reference_truth_ratios=ref_path)
    with pytest.warns(UserWarning, match="forget file"):
        ev.load_reference_truth_ratios(ref_path, forget_file="forget05_perturbed.json")
    other = [0.5, 0.7, 1.3, 2.0]
    res = ev.evaluate_tofu(model, tok, sets, generate=False, reference_truth_ratios=other)
    assert res["forget_quality"] == ks_2samp(res["forget_truth_ratios"], other).pvalue
    # no retain / real authors / world facts here
    assert res["model_utility"] is None and res["model_utility_partial"] is None
    assert "no retain / real authors / world facts" in ev.format_table({"tofu": res})
    with pytest.raises(ValueError, match="same forget split"):
        ev.evaluate_tofu(None, tok, sets, generate=False, reference_truth_ratios=[1.0, 2.0])
    plain = {"forget": tofu_dir / "forget10.json"}
    with pytest.raises(ValueError, match="paraphrased_answer and perturbed_answer"):
        ev.evaluate_tofu(None, tok, plain, generate=False, reference_truth_ratios=other)
    with pytest.raises(ValueError, match="save_reference needs"):
        ev.evaluate_tofu(None, tok, plain, generate=False, save_reference=tmp_path / "new.json")
    ref_path.write_text("{}")
    with pytest.raises(ValueError, match="truth_ratios"):
        ev.load_reference_truth_ratios(ref_path)


def test_legacy_mode_caps_items_and_uses_paper_prompts(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    path = _write(tmp_path / "retain_perturbed.json", [_qa(i % 7, 5) for i in range(305)])
    res = ev.evaluate_tofu(model, tok, {"retain": path}, mode="legacy", generate=False, batch_size=64)
    assert res["sets"]["retain"]["num_items"] == 300
    assert res["template"] == "tofu-llama2"
    # SPEC §4.1 defines the pipeline for its model families only; fastunlearn's own templates
    # (the separately tokenised "llama2" and "phi" included) are refused with the supported list.
    for template in ("plain", "llama2", "phi", "chat"):
        with pytest.raises(
            ValueError,
            match=r"legacy mode .* \['tofu-llama2', 'tofu-llama3', 'tofu-phi'\]; got template "
            + repr(template),
        ):
            ev.evaluate_tofu(model, tok, {"retain": path}, mode="legacy", template=template)
    with pytest.raises(ValueError, match="unknown mode"):
        ev.evaluate_tofu(model, tok, {"retain": path}, mode="paper")
    with pytest.raises(ValueError, match="unknown TOFU set"):
        ev.evaluate_tofu(model, tok, {"holdout": path})


class NeverEos(torch.nn.Module):
    """A causal LM that never predicts EOS (its logit is −inf) and records each forward's input length."""

    def __init__(self, model, eos_token_id):
        super().__init__()
        self.model, self.eos, self.calls = model, eos_token_id, []

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False, logits_to_keep=0
    ):
        self.calls.append(input_ids.shape[1])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
        out.logits[..., self.eos] = float("-inf")
        return out


def test_legacy_generation_fills_exactly_200_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    # A prompt of 190-199 tokens leaves room for only a few answer tokens.
    words = 200
    while len(tok(f"[INST] {'town ' * words}? [/INST]")["input_ids"]) >= 200:
        words -= 1
    item = ev.TofuItem("town " * words + "?", "town", None, None, "x")
    (prompt,), (reference,) = _generation_prompts(tok, [item], "tofu-llama2", 200)
    assert 190 <= len(prompt) < 200
    assert prompt.tolist() == tok(f"[INST] {item.question} [/INST]")["input_ids"]  # the paper's prompt
    # The ROUGE reference is the part of the answer within the 200 tokens scored: here a prefix.
    assert reference and "town".startswith(reference)
    never_eos = NeverEos(model, tok.eos_token_id)
    # Legacy generation ignores max_new_tokens and batch_size: 200 tokens in total.
    answers = _greedy_answers(never_eos, tok, [prompt], legacy=True, max_new_tokens=3, batch_size=7)
    # The prefill yields the first token, each later call one more: 200 − len(prompt) tokens in all.
    assert never_eos.calls[0] == len(prompt)
    assert len(never_eos.calls) == 200 - len(prompt)
    seq = prompt[None]
    with torch.no_grad():  # the definition: no cache, no batching
        for _ in range(200 - len(prompt)):
            seq = torch.cat([seq, never_eos(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert seq.shape[1] == 200
    assert answers[0] == tok.decode(seq[0, len(prompt) :].tolist(), skip_special_tokens=True).strip()


def test_legacy_generation_budget_is_per_batch_of_30_in_file_order(model_and_tokenizer):
    """The paper's generate(max_length=200) on batches of 30 in file order: every row of a batch gets
    200 − (its batch's width) tokens, so a short prompt batched with a long one gets fewer."""
    model, tok = model_and_tokenizer
    never_eos = NeverEos(model, tok.eos_token_id)
    lengths = [150] + [5] * 30 + [20]  # batches: items 0-29 (width 150), 30-31 (width 20)
    prompts = [torch.arange(3, 3 + n) % len(tok) for n in lengths]
    answers = _greedy_answers(never_eos, tok, prompts, legacy=True, max_new_tokens=200, batch_size=64)
    # Two prefills (widths 150 and 20), then one call per further token of each batch.
    assert never_eos.calls[0] == 150 and never_eos.calls[50] == 20
    assert len(never_eos.calls) == (200 - 150) + (200 - 20)
    assert len(answers) == 32 and all(answers)


# --------------------------------------------------------------------------------------------------
# extraction protocol, evaluate() and the command


def test_evaluate_extraction_equals_metrics(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    texts = [f"Author {i} was born in town {i} and wrote many books about town {i + 1}." for i in range(3)]
    path = _write(tmp_path / "seqs.jsonl", [{"text": t} for t in texts])
    res = ev.evaluate(model, tok, extraction={"data": path, "n": 3, "max_length": 12})
    ids, mask = ev.tokenize_texts(tok, texts, max_length=12)
    assert mask.sum(1).max() == 12
    ma = M.memorization_accuracy(model, ids, mask)
    el = M.extraction_likelihood(model, ids, n=3, attention_mask=mask, method="naive")
    ext = res["extraction"]
    assert ext["per_sequence"]["ma"] == ma.tolist()
    assert ext["per_sequence"]["el_3"] == pytest.approx(el.tolist(), abs=1e-12)
    assert ext["ma"] == pytest.approx(ma.mean().item()) and ext["num_sequences"] == 3
    assert "EL_3" in ev.format_table(res)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ev.evaluate(model, tok)


def test_eval_command_end_to_end(model_and_tokenizer, tofu_dir, tmp_path, capsys):
    from fastunlearn.cli import eval as cli_eval

    model, tok = model_and_tokenizer
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    parser = argparse.ArgumentParser(prog="fastunlearn")
    cli_eval.add_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(["eval", *argv])
        return args.func(args)

    ref, out = tmp_path / "ref.json", tmp_path / "eval.json"
    base = [
        str(model_dir),
        "--tofu",
        str(tofu_dir),
        "--template",
        "phi",
        "--no-generate",
        "--device",
        "cpu",
    ]
    assert run(*base, "--save-reference", str(ref)) == 0
    from fastunlearn.cli import main as cli_main  # the registered `fastunlearn eval`

    assert cli_main(["eval", *base, "--reference", str(ref)]) == 0
    assert run(*base, "--reference", str(ref), "--output", str(out)) == 0
    saved = json.loads(out.read_text())
    assert saved["tofu"]["forget_quality"] == pytest.approx(1.0)  # the same model against itself
    assert "forget quality" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="exists"):
        run(*base, "--output", str(out))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run(str(model_dir))
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        run(str(tmp_path / "none"), "--tofu", str(tofu_dir))


def test_eval_command_takes_the_template_of_the_run(model_and_tokenizer, tofu_dir, tmp_path, capsys):
    """`fastunlearn eval OUT/merged` scores with the template and length the run trained with."""
    from fastunlearn.cli import main as cli_main

    model, tok = model_and_tokenizer
    run_dir = tmp_path / "run"
    model.save_pretrained(run_dir / "merged")
    tok.save_pretrained(run_dir / "merged")
    (run_dir / "run_config.json").write_text(json.dumps({"options": {"template": "phi", "max_length": 200}}))
    common = ["--tofu", str(tofu_dir), "--no-generate", "--device", "cpu", "--output"]
    implicit, explicit, plain = (tmp_path / f"{name}.json" for name in ("implicit", "explicit", "plain"))
    assert cli_main(["eval", str(run_dir / "merged"), *common, str(implicit)]) == 0
    assert "template 'phi' and max length 200 from the run's run_config.json" in capsys.readouterr().out
    assert cli_main(["eval", str(run_dir / "merged"), *common, str(explicit), "--template", "phi",
                     "--max-length", "200"]) == 0  # fmt: skip
    assert cli_main(["eval", str(run_dir / "merged"), *common, str(plain), "--template", "plain"]) == 0
    tofu = {name: json.loads(path.read_text())["tofu"] for name, path in
            (("implicit", implicit), ("explicit", explicit), ("plain", plain))}  # fmt: skip
    assert tofu["implicit"] == tofu["explicit"]
    assert tofu["implicit"] != tofu["plain"]

    # Legacy mode takes a run's tofu-* template (the run's max length does not apply: it cuts at 200)...
    def legacy(output, *extra):
        argv = ["eval", str(run_dir / "merged"), *common, str(output), "--mode", "legacy", "--overwrite"]
        return cli_main([*argv, *extra])

    options = {"template": "tofu-phi", "max_length": 64}
    (run_dir / "run_config.json").write_text(json.dumps({"options": options}))
    assert legacy(implicit) == 0
    assert "template 'tofu-phi' from the run's run_config.json" in capsys.readouterr().out
    assert legacy(explicit, "--template", "tofu-phi") == 0
    tofu = {name: json.loads(path.read_text())["tofu"] for name, path in
            (("implicit", implicit), ("explicit", explicit))}  # fmt: skip
    assert tofu["implicit"] == tofu["explicit"] and tofu["implicit"]["template"] == "tofu-phi"
    # ... and says so when the run's template is not one of SPEC §4.1's.
    (run_dir / "run_config.json").write_text(json.dumps({"options": {"template": "phi"}}))
    assert legacy(implicit) == 2  # no number under a template the user did not choose
    assert "template 'phi', which legacy mode does not define; give --template" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# callbacks


def _tiny_trainer(model, tok, callbacks, epochs, tmp_path):
    from transformers import Trainer, TrainingArguments

    examples = fdata.tokenize_records([_qa(i) for i in range(4)], tok, data_format="qa", template="phi")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=epochs,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=Data(),
        data_collator=lambda exs: fdata.collate(exs, fdata.pad_id_of(tok)),
        callbacks=callbacks,
    )


def test_cached_reference_truth_ratios_and_summary(model_and_tokenizer, tofu_dir, tmp_path):
    model, tok = model_and_tokenizer
    path = tmp_path / "ref.json"
    ratios = ev.cached_reference_truth_ratios(model, tofu_dir, path, tokenizer=tok, template="phi")
    direct = ev.evaluate_tofu(
        model, tok, {"forget": tofu_dir / "forget10_perturbed.json"}, template="phi", generate=False
    )
    assert ratios == direct["forget_truth_ratios"]
    # Second call reads the file: a model that cannot run proves nothing is recomputed.
    assert ev.cached_reference_truth_ratios(None, tofu_dir, path, template="phi") == pytest.approx(ratios)
    with pytest.raises(ValueError, match="template"):  # the default template is "plain"
        ev.cached_reference_truth_ratios(None, tofu_dir, path)
    res = ev.evaluate_tofu(model, tok, tofu_dir, template="phi", generate=False, reference_truth_ratios=path)
    summary = ev.summarize_tofu(res)
    assert summary["forget_quality"] == pytest.approx(1.0)
    # Without generation there is no ROUGE-L: 6 of the 9 numbers, so no model utility, a partial one.
    six = [res["sets"][name][metric] for name in ("retain", "real_authors", "world_facts")
           for metric in ("prob", "truth_ratio")]  # fmt: skip
    assert summary["model_utility"] is None and summary["model_utility_num_components"] == 6
    assert summary["model_utility_partial"] == pytest.approx(6 / sum(1 / x for x in six), rel=1e-12)
    assert "model utility (partial, 6 of 9)" in ev.format_table({"tofu": res})
    assert summary["retain_prob"] == res["sets"]["retain"]["prob"]
    assert "forget_rougeL_recall" not in summary  # generation was skipped
