"""Every check of a run happens before the model's weights load, and a refused --overwrite loses nothing.

The weights loader is replaced by one that fails the test: each bad argument must be reported (one
``ValueError``-like error naming the option, file or line) without reaching it. The same refusals are
checked through the command line, where they are one line naming the flag, and exit status 2.
"""

import json
import os
import shutil

import pytest
import torch
from helpers.workspace import build_workspace
from transformers import AutoModelForCausalLM

from fastunlearn.cli import main
from fastunlearn.models.loading import load_model_and_tokenizer
from fastunlearn.training.pipeline import unlearn


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("preflight"))


@pytest.fixture
def no_weights(monkeypatch):
    def load(*args, **kwargs):
        pytest.fail("the weights were loaded before the bad argument was found")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)


@pytest.fixture
def finished(tmp_path):
    """An output directory holding a finished run (the files a run writes)."""
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_text("old")
    (out / "metrics.json").write_text('{"old": 1}')
    (out / "run_config.json").write_text('{"old": 1}')
    return out


def snapshot(path):
    return {
        os.path.relpath(os.path.join(root, f), path): open(os.path.join(root, f)).read()
        for root, _, files in os.walk(path)
        for f in files
    }


def model_copy(ws, tmp_path, edit):
    """A copy of the workspace model with ``edit(directory)`` applied."""
    target = tmp_path / "model"
    shutil.copytree(ws / "model", target)
    edit(target)
    return target


def no_weights_file(d):
    os.unlink(d / "model.safetensors")


def missing_shard(d):
    os.replace(d / "model.safetensors", d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def no_config(d):
    os.unlink(d / "config.json")


def small_vocab(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 20}))


CASES = {
    # name: (options, model edit, data edit, error, message)
    "target module": (
        dict(target_modules=["nonexistent"]),
        None,
        None,
        ValueError,
        "'nonexistent' matches no",
    ),
    "lora target": (
        dict(init="lora", target_modules=["q_proj", "nope"]),
        None,
        None,
        ValueError,
        "target_modules entry 'nope' matches no module",
    ),
    "rank": (dict(lora_r=1000), None, None, ValueError, r"lora_r=1000 exceeds min\(out, in\) = 32"),
    "json array": (
        {},
        None,
        '[{"question": "a", "answer": "b"},\n 3]\n',
        ValueError,
        r"forget\.json:2: expected a JSON object \(a record\), got int",
    ),
    "bad line": (
        {},
        None,
        '{"question": "a", "answer": "b"}\n{"question": "a"}\n',
        ValueError,
        r"forget\.json:2: missing field 'answer'",
    ),
    "template": (dict(template="chat"), None, None, ValueError, "needs a tokenizer with a chat template"),
    "length": (dict(max_length=4), None, None, ValueError, r"forget\.json:1: every label is masked"),
    "no weights": ({}, no_weights_file, None, ValueError, "holds no safetensors weights"),
    "missing shard": ({}, missing_shard, None, ValueError, r"lacks the weight shard\(s\)"),
    "no config": ({}, no_config, None, ValueError, "holds no config.json"),
    "vocabulary": ({}, small_vocab, None, ValueError, r"outside the model's vocabulary \(20\)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_argument_is_found_before_the_weights_load_and_overwrite_loses_nothing(
    case, ws, tmp_path, finished, no_weights
):
    options, edit_model, data, error, message = CASES[case]
    model = model_copy(ws, tmp_path, edit_model) if edit_model else ws / "model"
    forget = ws / "forget.json"
    if data is not None:
        forget = tmp_path / "forget.json"
        forget.write_text(data)
    before = snapshot(finished)
    options = {"init": "fila", "template": "phi", "progress": False, **options}
    init = options.pop("init")
    with pytest.raises(error, match=message):
        unlearn(
            model, None, forget, ws / "retain.json", init=init, output_dir=finished, overwrite=True, **options
        )
    assert snapshot(finished) == before  # the finished run is whole, and nothing was staged


def test_the_output_is_checked_first(ws, finished, no_weights):
    with pytest.raises(FileExistsError, match="holds a finished run; pass overwrite=True"):
        unlearn(
            ws / "model", None, ws / "forget.json", ws / "retain.json", output_dir=finished, progress=False
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--overwrite", "--rank", "1000"], "--rank 1000 exceeds min(out, in) = 32"),
        (["--overwrite", "--target-modules", "q_proj,nonexistent"], "'nonexistent' matches no linear layer"),
        (["--overwrite", "--lr", "-1e-4"], "--lr must be positive, got -0.0001"),
        (["--overwrite", "--epochs", "-1"], "--epochs must be positive, got -1.0"),
        (["--resume", "--overwrite"], "--overwrite and --resume exclude each other"),
        ([], "is not empty: it holds a finished run; pass --overwrite to replace it"),
    ],
)
def test_command_line_refusals_are_one_line_naming_the_flag(ws, finished, no_weights, capsys, extra, message):
    before = snapshot(finished)
    argv = ["unlearn", str(ws / "model"), "--forget", str(ws / "forget.json"), "--retain"]
    argv += [str(ws / "retain.json"), "--output", str(finished), "--template", "phi", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "=True" not in err  # Python argument names are for the Python API
    assert snapshot(finished) == before


def test_unreadable_weights_are_one_error(ws, tmp_path):
    def corrupt(d):
        (d / "model.safetensors").write_bytes(b"not safetensors")

    with pytest.raises(ValueError, match="cannot read the weights in"):
        load_model_and_tokenizer(model_copy(ws, tmp_path, corrupt))


def test_fisher_and_eval_check_before_loading(ws, tmp_path, no_weights, capsys):
    (tmp_path / "dir").mkdir()
    base = ["fisher", str(ws / "model"), "--data", str(ws / "forget.json"), "--template", "phi"]
    for overwrite in ([], ["--overwrite"]):
        assert main([*base, "--output", str(tmp_path / "dir"), *overwrite]) == 2
        assert f"--output {tmp_path / 'dir'} is a directory" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "f.safetensors"), "--target-modules", "nope"]) == 2
    assert "'nope' matches no linear layer" in capsys.readouterr().err
    evaluate = ["eval", str(ws / "model"), "--forget", str(ws / "forget_perturbed.json"), "--no-generate"]
    if not torch.cuda.is_available():
        assert main([*evaluate, "--device", "cuda"]) == 2
        assert "device 'cuda': this PyTorch build has no CUDA support" in capsys.readouterr().err
    assert main(["eval", str(ws / "model"), "--tofu", str(ws), "--forget-split", "forget10"]) == 2
    assert "no forget split 'forget10' in" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"question": "a", "answer": \n')
    assert main(["eval", str(ws / "model"), "--forget", str(bad)]) == 2
    assert "bad.json:1: invalid JSON (Expecting value at the end of the line)" in capsys.readouterr().err


def test_the_data_is_read_once(ws, tmp_path, monkeypatch):
    """Records given as a one-shot iterable reach the weights: the run reads each data set once."""

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    records = [json.loads(line) for line in (ws / "forget.json").read_text().splitlines()]
    with pytest.raises(Loaded):
        unlearn(ws / "model", None, iter(records), ws / "retain.json", output_dir=tmp_path / "o",
                template="phi", lora_r=4, progress=False)  # fmt: skip
