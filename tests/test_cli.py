"""The ``fastunlearn`` command end to end on a tiny model: unlearn, fisher, demo, refusals and resume."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.workspace import SIZE, build_workspace
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastunlearn import data as fdata
from fastunlearn import demo
from fastunlearn._io import write_text
from fastunlearn.cli import build_parser, main
from fastunlearn.demo import STOP_PATIENCE
from fastunlearn.demo.models import _FACTS
from fastunlearn.evaluation.stop_callback import read_trajectory
from fastunlearn.fisher import FisherEstimate, estimate_fisher
from fastunlearn.models.devices import resolve_precision, training_device


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("cli"))


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
    assert {"prob", "acc"} <= set(metrics["after"]["forget"]) and metrics["train"]["global_step"] == 3
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

    # Resuming a finished run is refused and changes nothing.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(args_for(workspace, out, "--init", "fila", "--resume")) == 2
    assert "holds a finished run: there is nothing to resume (pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    argv = args_for(
        workspace, out, "--init", "lora", "--method", "npo", "--overwrite", "--no-eval", "--no-fused"
    )
    assert main(argv) == 0
    config = json.loads((out / "run_config.json").read_text())
    assert config["options"]["method"] == "npo" and config["options"]["init"] == "lora"
    assert not (out / "fisher").exists()
    assert config["options"]["fused"] is False
    assert config["precision"] == resolve_precision("auto", training_device())  # fp32 on CPU


@pytest.mark.slow
def test_unlearn_with_a_tofu_template_then_eval_uses_it(workspace, tmp_path, capsys):
    """`unlearn --template tofu-phi` trains on TOFU's encoding (SPEC §4.1) and records the template;
    `eval --mode legacy` of the run's adapter takes it from run_config.json."""
    from fastunlearn.evaluation.likelihood import basic_metrics

    out = tmp_path / "run"
    argv = args_for(workspace, out, "--init", "lora")
    argv[argv.index("--template") + 1] = "tofu-phi"
    assert main(argv) == 0
    assert json.loads((out / "run_config.json").read_text())["options"]["template"] == "tofu-phi"
    model = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    examples = fdata.prepare(str(workspace / "forget.json"), tok, name="forget", template="tofu-phi")
    expected = basic_metrics(model, fdata.batches(examples, fdata.pad_id_of(tok), 16))
    before = json.loads((out / "metrics.json").read_text())["before"]["forget"]
    assert before["prob"] == pytest.approx(expected["prob"], rel=1e-5)
    capsys.readouterr()

    forget, result = tmp_path / "forget_perturbed.json", tmp_path / "eval.json"
    demo.write_jsonl(str(forget), demo.generate_dataset(SIZE.authors, seed=1)["forget_perturbed"][:6])
    eval_argv = ["eval", str(out / "adapter"), "--forget", str(forget), "--mode", "legacy"]
    assert main([*eval_argv, "--no-generate", "--device", "cpu", "--output", str(result)]) == 0
    assert "template 'tofu-phi' from the run's run_config.json" in capsys.readouterr().out
    assert json.loads(result.read_text())["tofu"]["template"] == "tofu-phi"


def test_unlearn_command_user_errors(workspace, tmp_path, capsys):
    argv = args_for(workspace, tmp_path / "a")
    argv[1] = str(tmp_path / "missing-model")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is neither a local directory nor a Hugging Face Hub id" in err

    bad = tmp_path / "bad.json"
    write_text(str(bad), '{"question": "a", "answer": "b"}\n{"question": "a", "answer": \n')
    argv = args_for(workspace, tmp_path / "b")
    argv[argv.index("--forget") + 1] = str(bad)
    assert main(argv) == 2
    assert "bad.json:2: invalid JSON" in capsys.readouterr().err
    with pytest.raises(ValueError, match="invalid JSON"):
        main(["--debug", *argv])
    assert main([*args_for(workspace, tmp_path / "c"), "--fisher-memory", "lots"]) == 2
    assert "invalid memory size 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


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
    # In groups of layers (8 KiB: one fp32 64×32 MLP accumulator, or q+k+v): one pass per group, the same
    # estimate (to the fp32 tolerance of tests/test_fisher_stream.py).
    assert main([*argv, "--overwrite", "--fisher-memory", "8KiB"]) == 0
    grouped = FisherEstimate.load(out)
    for name in direct:
        scale = direct[name].abs().max().item()
        torch.testing.assert_close(grouped[name], direct[name], rtol=1e-4, atol=1e-6 * scale)
    assert main([*argv, "--overwrite", "--fisher-memory", "8 KB/s"]) == 2
    assert "invalid memory size '8 KB/s'" in capsys.readouterr().err


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
            assert {"prob", "acc"} <= set(metrics[when][split])
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
    # Evaluated every epoch: the trajectory ends at the state scored "after" (the whole forget set is
    # within --eval-items; the same numbers up to the rounding of another batch shape).
    rows = read_trajectory(out / "trajectory.csv")
    steps = metrics["train"]["global_step"]
    assert (
        rows[0]["step"] == 0
        and rows[-1]["step"] == steps
        and len(rows) == 1 + demo.SIZES["tiny"].unlearn_epochs
    )
    assert rows[-1]["forget.prob"] == pytest.approx(after["forget"]["prob"], rel=1e-4)
    assert metrics["stopping"]["trajectory_csv"] == str(out / "trajectory.csv")
    # The run is `fastunlearn unlearn` with the demo's settings: printed, and recorded with the run.
    command = json.loads((out / "run_config.json").read_text())["command"]
    assert command == metrics["command"] and f"the same run as the command\n  {command}\n" in first
    assert all(f" {part}" in command for part in ("--template tofu-phi", "--max-length 64", "--threads 1"))
    (root,) = os.listdir(cache)
    assert (cache / root / "reference_truth_ratios.json").is_file()
    for split in ("forget", "retain", "forget_perturbed", "retain_perturbed"):
        records, fmt = fdata.load_records(cache / root / "data" / f"{split}.json")
        assert fmt == "qa"
    assert len(records[0]["perturbed_answer"]) == 5 and "paraphrased_answer" in records[0]

    assert main([*argv, "--output", str(out)]) == 2  # a second run into the same output is refused
    err = capsys.readouterr().err
    assert "--overwrite" in err and "resume" not in err  # the demo has no --resume
    assert main([*argv, "--output", str(tmp_path / "demo2"), "--method", "gd", "--init", "lora"]) == 0
    second = capsys.readouterr().out
    assert "Using cached demo models" in second and "Generated" not in second
    # --stop: the tofu rule against the demo's retain-only model, in the run and in its command.
    assert main([*argv, "--output", str(tmp_path / "demo3"), "--stop"]) == 0
    third = capsys.readouterr().out
    stopped = json.loads((tmp_path / "demo3" / "metrics.json").read_text())
    summary = stopped["stopping"]
    assert summary["rule"].startswith("tofu: forget.acc<=") and summary["restore"] == "best"
    assert summary["patience"] == STOP_PATIENCE and f"\n{summary['rule']}: " in third
    for words in ("--stop-when tofu", "--patience 3 --restore best", "--reference-model "):
        assert words in stopped["command"], words


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
        fact = _FACTS[i % len(_FACTS)]
        answer, para = fact["answer"], fact["paraphrased_answer"]

        def split(template, text, name=r["author"]):
            head, tail = template.format(n=name, v="\0").split("\0")
            assert text.startswith(head) and text.endswith(tail), (template, text)
            return text[len(head) : len(text) - len(tail)]

        value = split(answer, r["answer"])
        assert split(para, r["paraphrased_answer"]) == value
        wrong = [split(para, p) for p in r["perturbed_answer"]]
        assert value not in wrong and len(set(wrong)) == len(wrong) and all(wrong)


# --------------------------------------------------------------------------------------------------
# Run safety, messages and options (issue 8)


def test_top_level_help_imports_neither_torch_nor_transformers():
    """`fastunlearn --help` used to import PyTorch (seconds): the parser is built from a static table."""
    code = (
        "import sys\nfrom fastunlearn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nheavy = {'torch', 'transformers', 'peft'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "unlearn" in done.stdout and "eval" in done.stdout


def test_list_options_take_commas_and_repeats_and_never_swallow_the_model():
    parser = build_parser(["unlearn"])
    required = ["--forget", "f.json", "--output", "out"]
    args = parser.parse_args(["unlearn", "--target-modules", "q_proj,v_proj", "MODEL", *required])
    assert args.target_modules == ["q_proj", "v_proj"] and args.model == "MODEL"
    args = parser.parse_args(
        ["unlearn", "--target-modules", "q_proj", "--target-modules", "v_proj,o_proj", "MODEL", *required]
    )
    assert args.target_modules == ["q_proj", "v_proj", "o_proj"] and args.model == "MODEL"
    assert parser.parse_args(["unlearn", "MODEL", *required, "--lr", "-1e-4"]).learning_rate == -1e-4


@pytest.mark.parametrize("command", ["unlearn", "eval", "fisher"])
def test_threads_option(command, workspace, monkeypatch):
    import importlib

    module = importlib.import_module(f"fastunlearn.cli.{command}")
    seen = []
    name = {"unlearn": "_run_unlearn", "eval": "_main", "fisher": "_run_fisher"}[command]
    monkeypatch.setattr(module, name, lambda args: seen.append(torch.get_num_threads()) or 0)
    data = {"unlearn": ["--forget", "f", "--output", "o"], "fisher": ["--data", "d", "--output", "o"]}
    before = torch.get_num_threads()
    assert main([command, str(workspace / "model"), *data.get(command, []), "--threads", "1"]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def test_ctrl_c_leaves_a_run_that_resume_finishes_and_overwrite_keeps_the_old_run(
    workspace, tmp_path, monkeypatch, capsys
):
    from fastunlearn import _io
    from fastunlearn.training.trainer import UnlearnTrainer

    monkeypatch.chdir(workspace)
    previous = os.umask(0o022)
    _io.umask.cache_clear()
    try:
        out = tmp_path / "run"

        def argv(*extra):
            args = args_for(workspace, out, "--init", "lora", "--no-eval", "--threads", "1")
            if "--epochs" in extra:  # an option is given once
                del args[args.index("--epochs") : args.index("--epochs") + 2]
            args[1] = "model"  # relative: the adapter must still record where the base is
            return [*args, *extra]

        assert main(argv()) == 0
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(workspace / "model")
        assert oct(os.stat(out / "adapter").st_mode & 0o777) == oct(0o755)
        assert oct(os.stat(out / "metrics.json").st_mode & 0o777) == oct(0o644)
        assert oct(os.stat(out / "adapter" / "adapter_model.safetensors").st_mode & 0o777) == oct(0o644)
    finally:
        os.umask(previous)
        _io.umask.cache_clear()
    old = {p: (out / p).read_bytes() for p in ("metrics.json", "adapter/adapter_model.safetensors")}
    capsys.readouterr()

    original = UnlearnTrainer.compute_loss

    def ctrl_c_in_second_epoch(self, *args, **kwargs):
        if self.state.global_step >= 3:  # the checkpoint of epoch 1 (step 3) is written
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UnlearnTrainer, "compute_loss", ctrl_c_in_second_epoch)
    assert main(argv("--overwrite", "--epochs", "2")) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"interrupted; rerun with --resume to continue from step 3; the finished run in {out} is untouched"
    )
    assert "Traceback" not in err
    assert {p: (out / p).read_bytes() for p in old} == old
    assert main(argv("--epochs", "2")) == 2  # a plain re-run would lose the finished run
    assert "--overwrite to replace it" in capsys.readouterr().err
    monkeypatch.setattr(UnlearnTrainer, "compute_loss", original)
    assert main(argv("--epochs", "2", "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["global_step"] == 6
    assert json.loads((out / "run_config.json").read_text())["options"]["num_epochs"] == 2
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "metrics.json", "run_config.json"]
    capsys.readouterr()

    # Ctrl-C before the first checkpoint of a new run: a plain re-run is refused, --overwrite starts again.
    fresh = tmp_path / "fresh"

    def ctrl_c_at_once(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(UnlearnTrainer, "compute_loss", ctrl_c_at_once)
    out = fresh
    assert main(argv()) == 130
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith("interrupted before the first checkpoint; rerun with --resume to train from step 0 again")
    )
    monkeypatch.setattr(UnlearnTrainer, "compute_loss", original)
    assert main(argv()) == 2
    assert "holds an interrupted run: pass --resume to continue it, or --overwrite" in capsys.readouterr().err
    assert main(argv("--overwrite")) == 0


def test_adapters_resolve_their_base_from_anywhere_and_eval_takes_base_model(
    workspace, tmp_path, monkeypatch, capsys
):
    import warnings

    from peft import LoraConfig, get_peft_model

    from fastunlearn.fisher import save_adapter
    from fastunlearn.models.loading import load_model_and_tokenizer

    monkeypatch.chdir(workspace)
    model = AutoModelForCausalLM.from_pretrained("model")
    adapter = tmp_path / "adapter"
    save_adapter(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace / "model")  # as typed it was "model"

    config["base_model_name_or_path"] = "./model"  # what adapters written before recorded
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    evaluate = ["eval", str(adapter), "--forget", str(workspace / "forget_perturbed.json"), "--no-generate",
                "--template", "phi"]  # fmt: skip
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "'./model', which is neither a local directory nor in the Hugging Face cache; pass --base-model"
        in err
    )
    assert main([*evaluate, "--base-model", str(workspace / "model")]) == 0
    assert "forget" in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model_and_tokenizer(adapter, base_model=workspace / "model")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_demo_refusal_names_overwrite_only(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    (out / "metrics.json").write_text("{}")
    argv = ["demo", "--size", "tiny", "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "resume" not in err
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_the_readme_shows_the_committed_demo_run():
    """The README's demo numbers and command are those of benchmarks/results/demo_*.json."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    results = root / "benchmarks" / "results"
    metrics = json.loads((results / "demo_metrics.json").read_text())
    config = json.loads((results / "demo_run_config.json").read_text())
    before, after = metrics["before"], metrics["after"]
    rows = [
        ("forget prob", before["forget"]["prob"], after["forget"]["prob"], ".4f"),
        ("retain prob", before["retain"]["prob"], after["retain"]["prob"], ".4f"),
        ("forget quality (KS p)", before["tofu"]["forget_quality"], after["tofu"]["forget_quality"], ".3g"),
        *[
            (label, before["tofu"][key], after["tofu"][key], ".3g")
            for label, key in (
                ("retain utility (3 of 9)", "model_utility_partial"),
                ("forget ROUGE-L", "forget_rougeL_recall"),
            )
        ],
    ]
    for label, b, a, fmt in rows:
        assert f"| {label} | {b:{fmt}} | {a:{fmt}} |" in readme, label
    assert config["command"] == metrics["command"]
    argv = shlex.split(config["command"])
    argv[argv.index("--output") + 1] = "fastunlearn-demo"
    cache = os.path.dirname(config["options"]["model"])
    expected = " ".join(arg.replace(cache, "CACHE") for arg in argv)
    block = readme.split("```bash\nfastunlearn unlearn CACHE/")[1].split("```")[0]
    assert " ".join(("fastunlearn unlearn CACHE/" + block).replace("\\\n", " ").split()) == expected
