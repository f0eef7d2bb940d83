"""Experiment trackers: a run with ``report_to="tensorboard"`` writes event files that read back with the
training loss at every logged step and each evaluation's metrics and stopping decisions at the step
it was made; an unknown tracker or one whose package is missing is one line, and nothing is written."""

from __future__ import annotations

import importlib.util

import pytest
from helpers.workspace import build_workspace

from fastunlearn import unlearn
from fastunlearn.cli import main
from fastunlearn.evaluation.stop_callback import read_trajectory

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("trackers"))


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_receives_the_loss_and_every_evaluation_at_its_step(workspace, tmp_path):
    out = tmp_path / "run"
    # A rule the model satisfies from the start: training stops at the first evaluation after the baseline.
    result = unlearn(
        str(workspace / "model"), None, str(workspace / "forget.json"), str(workspace / "retain.json"),
        init="lora", output_dir=out, report_to="tensorboard", run_name="tiny", logging_steps=1, eval_every=1,
        learning_rate=1e-2, warmup_epochs=0,
        stop="retain.nll<=100", num_epochs=3, batch_size=2, gradient_accumulation_steps=1, lora_r=4,
        lora_alpha=8, progress=False, evaluate=False,
    )  # fmt: skip
    assert result.metrics["stopping"]["stopped_step"] == 1
    scalars = _scalars(out / "logs")
    rows = read_trajectory(out / "trajectory.csv")
    assert [row["step"] for row in rows] == [0, 1]
    for metric in ("forget.prob", "forget.nll", "retain.prob", "satisfied"):
        logged = scalars[f"eval/{metric}"]
        # TensorBoard stores float32: the trajectory's values to its rounding
        assert [s for s, _ in logged] == [0, 1], metric
        assert [v for _, v in logged] == pytest.approx([float(r[metric]) for r in rows], rel=2**-23), metric
    assert scalars["eval/stopped"] == [(1, 1.0)]
    assert [s for s, _ in scalars["train/loss"]] == [1]
    assert scalars["train/loss"][0][1] == pytest.approx(rows[1]["loss"], rel=1e-3)  # the row keeps 4 digits
    assert "train/forget_loss" in scalars and "train/learning_rate" in scalars


@pytest.mark.parametrize(
    ("report_to", "missing", "message"),
    [
        ("tensorboard,mlflow", None, "unknown tracker 'mlflow' in --report-to"),
        ("wandb", "wandb", "--report-to 'wandb' needs the wandb package: pip install wandb"),
        ("none,tensorboard", None, "'none' excludes the other trackers"),
    ],
)
def test_a_bad_tracker_is_one_line_and_nothing_is_written(
    workspace, tmp_path, monkeypatch, capsys, report_to, missing, message
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == missing else find_spec(name)
    )
    out = tmp_path / "out"
    argv = ["unlearn", str(workspace / "model"), "--forget", str(workspace / "forget.json"), "--init", "lora"]
    assert main([*argv, "--method", "ga", "--output", str(out), "--report-to", report_to]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_trackio_takes_its_project_and_space_from_its_own_variables(workspace, tmp_path, monkeypatch):
    """transformers reads WANDB_PROJECT itself but trackio's project and Space only from its arguments:
    the run passes TRACKIO_PROJECT and TRACKIO_SPACE_ID on (checked on the arguments Trainer gets)."""
    from transformers import TrainerCallback, TrainingArguments

    if "project" not in TrainingArguments.__dataclass_fields__:
        pytest.skip("this transformers has no trackio arguments")
    monkeypatch.setenv("TRACKIO_PROJECT", "unlearning")
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/runs")
    seen = {}

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(project=args.project, space=args.trackio_space_id)

    unlearn(
        str(workspace / "model"), None, str(workspace / "forget.json"), str(workspace / "retain.json"),
        init="lora", output_dir=tmp_path / "run", num_epochs=1, batch_size=2, lora_r=4, progress=False,
        evaluate=False, callbacks=[Spy()],
    )  # fmt: skip
    assert seen == {"project": "unlearning", "space": "someone/runs"}
