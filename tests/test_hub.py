"""Models and data sets named by Hugging Face Hub id, resolved from a cache folder built here with the
network off (``HF_HUB_OFFLINE=1``): loading, ``unlearn`` / ``fisher`` / ``plan`` / ``eval`` from the
command line, the commit recorded in ``run_config.json`` and in the adapter, and the refusal of an id
the cache lacks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.hub import cache_repo, offline_cache
from helpers.workspace import build_workspace

from fastunlearn.cli import main
from fastunlearn.fisher import FisherEstimate
from fastunlearn.models.loading import load_model_and_tokenizer, model_source

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("datasets")

SPLITS_README = (
    "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: forget\n    path: forget.parquet\n"
    "  - split: retain\n    path: retain.parquet\n- config_name: texts\n  data_files:\n  - split: train\n"
    "    path: texts.parquet\n---\n"
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A workspace, and a cache holding its model as ``org/tiny`` and its data as ``org/authors``
    (splits ``forget`` and ``retain``; config ``texts``: raw text)."""
    root = tmp_path_factory.mktemp("hub")
    ws = build_workspace(root / "ws")
    repo = root / "repo"
    repo.mkdir()
    rows = {}
    for name in ("forget", "retain"):
        rows[name] = [json.loads(line) for line in (ws / f"{name}.json").read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows[name]), repo / f"{name}.parquet")
    texts = [{"text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for r in rows["forget"][:2]]
    pq.write_table(pa.Table.from_pylist(texts), repo / "texts.parquet")
    (repo / "README.md").write_text(SPLITS_README)
    cache = root / "cache"
    commits = {
        "model": cache_repo(cache, "org/tiny", ws / "model"),
        "data": cache_repo(cache, "org/authors", repo, repo_type="dataset"),
    }
    return ws, cache, commits


def test_a_model_by_hub_id_loads_from_the_cache(hub, monkeypatch):
    ws, cache, commits = hub
    offline_cache(monkeypatch, cache)
    source = model_source("org/tiny")
    assert os.path.basename(source.path) == commits["model"] and source.tokenizer == source.path
    assert model_source("org/tiny", revision=commits["model"]).path == source.path
    model, tokenizer = load_model_and_tokenizer("org/tiny")
    local, _ = load_model_and_tokenizer(ws / "model")
    ids = torch.tensor([tokenizer("the author was born in Paris")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, local(ids).logits, rtol=0, atol=0)  # the same weights
    with pytest.raises(FileNotFoundError, match=r"model 'org/tiny' at revision 'v2' is neither a local path"):
        model_source("org/tiny", revision="v2")
    with pytest.raises(ValueError, match=r"names a Hub revision, but the model .* is a local path"):
        model_source(ws / "model", revision="main")


def test_unlearn_from_the_hub_offline_records_the_commits(hub, tmp_path, monkeypatch):
    _, cache, commits = hub
    offline_cache(monkeypatch, cache)
    out = tmp_path / "out"
    argv = [
        "unlearn", "org/tiny", "--forget", "org/authors@forget", "--retain", "org/authors@retain",
        "--output", str(out), "--init", "fila", "--epochs", "1", "--batch-size", "2", "--grad-accum", "1",
        "--rank", "4", "--alpha", "8", "--no-progress", "--no-eval",
    ]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "run_config.json").read_text())
    assert record["options"]["revision"] == commits["model"]  # --config run_config.json loads this commit
    assert record["hub"] == {
        "model": {"hub": "org/tiny", "revision": commits["model"]},
        "forget": {"hub": "org/authors@forget", "revision": commits["data"]},
        "retain": {"hub": "org/authors@retain", "revision": commits["data"]},
    }
    assert record["fingerprints"]["model"] == f"hub:org/tiny@{commits['model']}"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == ("org/tiny", commits["model"])


def test_fisher_plan_and_eval_take_hub_ids(hub, tmp_path, monkeypatch, capsys):
    _, cache, _ = hub
    offline_cache(monkeypatch, cache)
    fisher = tmp_path / "f.safetensors"
    assert (
        main(["fisher", "org/tiny", "--data", "org/authors@forget", "--output", str(fisher), "--no-progress"])
        == 0
    )
    assert FisherEstimate.load(fisher).num_examples == 6
    capsys.readouterr()
    assert main(["plan", "org/tiny", "--rank", "4"]) == 0
    assert capsys.readouterr().out.strip()  # the plan of the cached config
    assert (
        main(["eval", "org/tiny", "--extraction", "org/authors:texts", "--sequence-length", "8", "--n", "4"])
        == 0
    )
    assert "EL_4" in capsys.readouterr().out


def test_an_id_the_cache_lacks_is_one_line_and_nothing_is_written(hub, tmp_path, monkeypatch, capsys):
    ws, cache, _ = hub
    offline_cache(monkeypatch, cache)
    cases = [
        (
            ["org/absent", "--forget", str(ws / "forget.json"), "--retain", str(ws / "retain.json")],
            "model 'org/absent' is neither a local path nor",
        ),
        (
            ["org/tiny", "--forget", "org/absent-data@forget", "--retain", "org/authors@retain"],
            "data set 'org/absent-data' is neither a local",
        ),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert main(["unlearn", *argv, "--output", str(out), "--init", "lora"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "pass --allow-download" in err[0], err
        assert not out.exists()
