"""The ``fastunlearn`` command end to end on a tiny model: unlearn, fisher, demo, refusals and resume."""

import dataclasses
import json
import math
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastunlearn import demo
from fastunlearn._io import write_text
from fastunlearn.cli import main
from fastunlearn.demo.data import _FACTS
from fastunlearn.fisher import FisherEstimate, estimate_fisher
from fastunlearn.modeling import resolve_precision, training_device
from fastunlearn.training import data as fdata

# The tiny demo model (hidden 32, 2 layers) on 4 authors.
SIZE = dataclasses.replace(demo.SIZES["tiny"], authors=4, hidden=32, layers=2, vocab=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = demo.generate_dataset(SIZE.authors, seed=1)
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}"
        for r in data["forget_perturbed"] + data["retain_perturbed"]
    ]
    tokenizer = demo.train_tokenizer(texts, SIZE.vocab)
    model = demo.build_model(tokenizer, SIZE, seed=0)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for name in ("forget", "retain"):
        demo.write_jsonl(str(root / f"{name}.json"), data[name][:6])
    return root


def args_for(ws, out, *extra):
    return [
        "unlearn",
        str(ws / "model"),
        "--forget",
        str(ws / "forget.json"),
        "--retain",
        str(ws / "retain.json"),
        "--output",
        str(out),
        "--template",
        "phi",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("command", [[], ["unlearn"], ["fisher"], ["demo"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: fastunlearn" in text
    if command == ["unlearn"]:
        assert "--overwrite" in text and "--resume" in text and "--allow-download" in text
    if command == ["demo"]:
        assert "--size" in text and "tiny" in text


@pytest.mark.slow
def test_unlearn_command_refusal_resume_and_overwrite(workspace, capsys):
    out = workspace / "run"
    assert main(args_for(workspace, out, "--init", "fila", "--merge")) == 0
    printed = capsys.readouterr().out
    assert "forget" in printed and "retain" in printed and "after/before" in printed
    for entry in ("adapter", "merged", "fisher", "metrics.json", "run_config.json"):
        assert (out / entry).exists(), entry
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"prob", "accuracy"} <= set(metrics["after"]["forget"]) and metrics["train"]["global_step"] == 3
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(workspace / "model"), out / "adapter"
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[1, 5, 9, 22, 40]])
    with torch.no_grad():
        torch.testing.assert_close(
            adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )

    assert main(args_for(workspace, out, "--init", "fila")) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err

    # Resuming the finished run loads its last checkpoint and Fisher estimates and trains no further step.
    assert main(args_for(workspace, out, "--init", "fila", "--resume")) == 0
    capsys.readouterr()
    assert json.loads((out / "metrics.json").read_text())["train"]["global_step"] == 3

    argv = args_for(
        workspace, out, "--init", "lora", "--method", "npo", "--overwrite", "--no-eval", "--no-fused"
    )
    assert main(argv) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["method"] == "npo" and config["init"] == "lora" and not (out / "fisher").exists()
    assert config["options"]["fused"] is False
    assert config["precision"] == resolve_precision("auto", training_device())  # fp32 on CPU


def test_unlearn_fused_and_precision_flags(tmp_path):
    from fastunlearn.cli import build_parser

    parse = build_parser().parse_args
    base = args_for(tmp_path, tmp_path / "out")
    assert (parse(base).fused, parse(base).precision) == (None, "auto")
    assert parse([*base, "--fused"]).fused is True and parse([*base, "--no-fused"]).fused is False
    assert parse([*base, "--bf16"]).precision == "bf16"
    assert parse([*base, "--precision", "fp16"]).precision == "fp16"
    with pytest.raises(SystemExit):
        parse([*base, "--precision", "fp8"])


def test_unlearn_command_user_errors(workspace, tmp_path, capsys):
    argv = args_for(workspace, tmp_path / "a")
    argv[1] = str(tmp_path / "missing-model")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a local directory" in err and "--allow-download" in err

    bad = tmp_path / "bad.json"
    write_text(str(bad), '{"question": "a", "answer": "b"}\n{"question": "a", "answer": \n')
    argv = args_for(workspace, tmp_path / "b")
    argv[argv.index("--forget") + 1] = str(bad)
    assert main(argv) == 2
    assert "bad.json:2: invalid JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="invalid JSON"):
        main(["--debug", *argv])


@pytest.mark.slow
def test_fisher_command_matches_the_api(workspace, tmp_path, capsys):
    out = tmp_path / "fisher.safetensors"
    argv = [
        "fisher",
        str(workspace / "model"),
        "--data",
        str(workspace / "forget.json"),
        "--output",
        str(out),
        "--template",
        "phi",
        "--batch-size",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    saved = FisherEstimate.load(out)
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    examples = fdata.prepare(str(workspace / "forget.json"), tok, name="forget", template="phi")
    direct = estimate_fisher(model, fdata.batches(examples, fdata.pad_id_of(tok), 3), progress=False)
    assert set(saved) == set(direct) and len(saved) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for name in direct:
        torch.testing.assert_close(saved[name], direct[name], rtol=0, atol=0)
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.slow
def test_demo_tiny_twice_uses_the_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "demo"
    argv = ["demo", "--size", "tiny", "--cache-dir", str(cache), "--no-progress"]
    assert main([*argv, "--output", str(out)]) == 0
    first = capsys.readouterr().out
    assert "Generated 10 fictitious authors" in first and "forget" in first
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        for split in ("forget", "retain"):
            assert {"prob", "accuracy"} <= set(metrics[when][split])
        tofu = metrics[when]["tofu"]
        keys = ("forget_quality", "model_utility_partial", "forget_truth_ratio_mean", "retain_rougeL_recall")
        for key in keys:
            assert tofu[key] >= 0 and math.isfinite(tofu[key]), (when, key)
        assert tofu["forget_quality"] <= 1 and tofu["model_utility_partial"] <= 1
        # The demo has no real-author or world-fact sets: TOFU's 9-number utility is not defined.
        assert tofu["model_utility"] is None and tofu["model_utility_num_components"] == 3
    assert "forget quality (KS p)" in first and "retain utility (3 of 9)" in first
    # The demo forgets, and only what it should. Seeds 0-3 of the tiny demo: answer probability
    # 0.97-0.99 on both sets before; after IHL + FILA, 0.07-0.18 of it on the forgotten author's
    # (worst 0.18x) and 0.74-0.87 on the retained ones' (worst 0.76x). Bounds about 2x wider.
    before, after = metrics["before"], metrics["after"]
    assert before["forget"]["prob"] >= 0.9 and before["retain"]["prob"] >= 0.9, before  # memorised
    forget_kept = after["forget"]["prob"] / before["forget"]["prob"]
    retain_kept = after["retain"]["prob"] / before["retain"]["prob"]
    assert forget_kept <= 0.4, f"forget probability kept {forget_kept:.2f}x"
    assert retain_kept >= 0.6, f"retain probability kept {retain_kept:.2f}x"
    assert forget_kept <= 0.5 * retain_kept  # forgetting is selective
    (root,) = os.listdir(cache)
    assert (cache / root / "reference_truth_ratios.json").is_file()
    for split in ("forget", "retain", "forget_perturbed", "retain_perturbed"):
        records, fmt = fdata.load_records(cache / root / "data" / f"{split}.json")
        assert fmt == "qa"
    assert len(records[0]["perturbed_answer"]) == 5 and "paraphrased_answer" in records[0]

    assert main([*argv, "--output", str(out)]) == 2  # a second run into the same output is refused
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "demo2"), "--method", "gd", "--init", "lora"]) == 0
    second = capsys.readouterr().out
    assert "Using cached demo models" in second and "Generated" not in second


def test_demo_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown demo size 'huge'"):
        demo.run_demo(str(tmp_path / "o"), size="huge", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="threads must be at least 1"):
        demo.run_demo(str(tmp_path / "o"), threads=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at least 2 authors"):
        demo.generate_dataset(1)
    assert (
        main(
            [
                "demo",
                "--size",
                "tiny",
                "--cache-dir",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                "--threads",
                "0",
            ]
        )
        == 2
    )
    assert "threads must be at least 1" in capsys.readouterr().err


def test_demo_dataset_is_deterministic_tofu_format():
    a, b = demo.generate_dataset(20, seed=3), demo.generate_dataset(20, seed=3)
    assert a == b and a != demo.generate_dataset(20, seed=4)
    per_author = len(a["forget"]) // 2
    assert len(a["forget"]) == 2 * per_author and len(a["retain"]) == 18 * per_author  # 10 % forgotten
    forget_authors = {r["author"] for r in a["forget_perturbed"]}
    assert len(forget_authors) == 2 and not forget_authors & {r["author"] for r in a["retain_perturbed"]}
    for plain, full in zip(
        a["forget"] + a["retain"], a["forget_perturbed"] + a["retain_perturbed"], strict=True
    ):
        assert set(plain) == {"question", "answer"} and plain["answer"] == full["answer"]
        assert len(full["perturbed_answer"]) == 5 and full["answer"] not in full["perturbed_answer"]
        assert len(set(full["perturbed_answer"])) == 5 and full["paraphrased_answer"] != full["answer"]


def test_demo_perturbed_answers_are_the_paraphrase_with_a_wrong_fact():
    # TOFU's truth ratio compares P̄(perturbed) with P̄(paraphrase): they must share the wording.
    data = demo.generate_dataset(6, seed=2)
    records = data["forget_perturbed"] + data["retain_perturbed"]
    assert len(records) == 6 * len(_FACTS)
    for i, r in enumerate(records):
        _, _, answer, _, para = _FACTS[i % len(_FACTS)]

        def split(template, text, name=r["author"]):
            head, tail = template.format(n=name, v="\0").split("\0")
            assert text.startswith(head) and text.endswith(tail), (template, text)
            return text[len(head) : len(text) - len(tail)]

        value = split(answer, r["answer"])
        assert split(para, r["paraphrased_answer"]) == value
        wrong = [split(para, p) for p in r["perturbed_answer"]]
        assert value not in wrong and len(set(wrong)) == len(wrong) and all(wrong)
