"""The output directory's states and transitions (fastunlearn.training.outputs), on hand-made runs.

Every cell of the table in the module docstring, the swap (and a crash inside it), checkpoints, and the
line printed after Ctrl-C. No model is trained: the runs are the files a run writes.
"""

import os

import pytest

from fastunlearn.training import outputs as O


def run_files(path, *, finished: bool, checkpoints=(), tag="old"):
    """The files of a run in ``path``: config, Fisher, complete checkpoints; adapter and metrics if
    ``finished``. ``tag`` is written into each file to tell runs apart."""
    os.makedirs(os.path.join(path, "fisher"), exist_ok=True)
    write(os.path.join(path, "run_config.json"), tag)
    write(os.path.join(path, "fisher", "forget.safetensors"), tag)
    for step in checkpoints:
        write(os.path.join(path, "checkpoints", f"checkpoint-{step}", "trainer_state.json"), tag)
    if finished:
        write(os.path.join(path, "adapter", "adapter_model.safetensors"), tag)
        write(os.path.join(path, "metrics.json"), tag)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


def read(path):
    with open(path) as handle:
        return handle.read()


def test_states(tmp_path):
    out = str(tmp_path / "out")
    assert O.inspect_output(out).state == "empty"
    os.makedirs(out)
    assert O.inspect_output(out).state == "empty"
    run_files(out, finished=False, checkpoints=[2])
    assert O.inspect_output(out).state == "interrupted" and O.inspect_output(out).has_run
    run_files(out, finished=True)
    assert O.inspect_output(out).state == "complete"
    write(os.path.join(out, "notes.txt"), "mine")
    write(os.path.join(out, ".metrics.json.k2j4.tmp"), "")  # a temporary of _io: ours
    state = O.inspect_output(out)
    assert state.state == "foreign" and state.foreign == ("notes.txt",)
    write(str(tmp_path / "file"), "")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        O.inspect_output(tmp_path / "file")


def test_plan_refusals_and_where_runs_are_built(tmp_path):
    empty, interrupted, complete, foreign = (str(tmp_path / n) for n in ("e", "i", "c", "f"))
    run_files(interrupted, finished=False)
    run_files(complete, finished=True)
    write(os.path.join(foreign, "notes.txt"), "mine")
    staging = os.path.join(complete, O.STAGING)
    for overwrite in (False, True):
        dirs = O.plan_run(empty, overwrite=overwrite, resume=False)
        assert (dirs.build, dirs.resume) == (empty, False)
    # An interrupted run is never started over by a plain run: it is resumed or overwritten.
    with pytest.raises(
        FileExistsError, match="holds an interrupted run: pass resume=True to continue it, or"
    ):
        O.plan_run(interrupted, overwrite=False, resume=False)
    assert O.plan_run(interrupted, overwrite=True, resume=False) == O.RunDirs(interrupted, interrupted, False)
    with pytest.raises(FileExistsError, match="holds a finished run; pass overwrite=True"):
        O.plan_run(complete, overwrite=False, resume=False)
    with pytest.raises(FileExistsError, match=r"files fastunlearn did not write \(notes\.txt\)"):
        O.plan_run(foreign, overwrite=False, resume=False)
    assert O.plan_run(complete, overwrite=True, resume=False).build == staging
    assert O.plan_run(foreign, overwrite=True, resume=False).build == os.path.join(foreign, O.STAGING)
    with pytest.raises(ValueError, match=r"resume=True but output_dir .* holds no run to resume"):
        O.plan_run(empty, overwrite=False, resume=True)
    with pytest.raises(ValueError, match="no run to resume"):
        O.plan_run(foreign, overwrite=False, resume=True)
    assert O.plan_run(interrupted, overwrite=False, resume=True).build == interrupted
    with pytest.raises(ValueError, match="holds a finished run: there is nothing to resume"):
        O.plan_run(complete, overwrite=False, resume=True)
    # A staged run (an interrupted --overwrite) is what resume continues; a plain run is still refused.
    run_files(staging, finished=False, checkpoints=[3], tag="new")
    assert O.plan_run(complete, overwrite=False, resume=True) == O.RunDirs(complete, staging, resume=True)
    with pytest.raises(FileExistsError, match="or resume=True to continue the unfinished run"):
        O.plan_run(complete, overwrite=False, resume=False)
    with pytest.raises(FileExistsError) as refused:
        O.plan_run(complete, overwrite=False, resume=False, resume_offered=False)
    assert "resume" not in str(refused.value)
    assert not os.path.exists(empty)  # planning writes nothing


def test_a_new_run_clears_only_an_interrupted_run_and_never_the_users_files(tmp_path):
    out = str(tmp_path / "out")
    run_files(out, finished=False, checkpoints=[2])
    run_files(os.path.join(out, O.STAGING), finished=False)
    with pytest.raises(FileExistsError, match="interrupted run at step 2"):
        O.plan_run(out, overwrite=False, resume=False)
    dirs = O.plan_run(out, overwrite=True, resume=False)
    O.start_run(dirs)
    assert os.listdir(out) == []
    run_files(out, finished=True)
    write(os.path.join(out, "notes.txt"), "mine")
    dirs = O.plan_run(out, overwrite=True, resume=False)
    O.start_run(dirs)
    assert sorted(os.listdir(out)) == sorted([O.STAGING, "adapter", "fisher", "metrics.json", "notes.txt",
                                              "run_config.json"])  # fmt: skip
    assert os.listdir(dirs.build) == []


def test_overwrite_swaps_only_a_finished_run_in_and_keeps_the_users_files(tmp_path):
    out = str(tmp_path / "out")
    run_files(out, finished=True, checkpoints=[4])
    write(os.path.join(out, "notes.txt"), "mine")
    dirs = O.plan_run(out, overwrite=True, resume=False)
    O.start_run(dirs)
    run_files(dirs.build, finished=False, checkpoints=[3], tag="new")
    # Interrupted here: the old run is whole, and the message says how to go on.
    assert read(os.path.join(out, "metrics.json")) == "old" and O.inspect_output(out).state == "foreign"
    assert O.interrupted_message(out) == (
        f"interrupted; rerun with resume=True to continue from step 3; the finished run in {out} is untouched"
    )
    dirs = O.plan_run(out, overwrite=False, resume=True)
    O.start_run(dirs)
    run_files(dirs.build, finished=True, tag="new")
    O.finish_run(dirs)
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "fisher", "metrics.json", "notes.txt",
                                       "run_config.json"]  # fmt: skip
    for entry in ("metrics.json", "run_config.json", "adapter/adapter_model.safetensors"):
        assert read(os.path.join(out, entry)) == "new", entry
    assert os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint-3"]  # the old run's went with it
    assert read(os.path.join(out, "notes.txt")) == "mine"


@pytest.mark.parametrize("moved", [0, 1, 3])
def test_a_swap_cut_short_is_rolled_forward(tmp_path, moved):
    """A crash after the old entries were moved aside and ``moved`` new entries were moved in."""
    out = str(tmp_path / "out")
    run_files(out, finished=True)
    staging = os.path.join(out, O.STAGING)
    run_files(staging, finished=True, tag="new")
    previous = os.path.join(out, O.PREVIOUS)
    os.makedirs(previous)
    for name in ("metrics.json", "adapter", "fisher", "run_config.json"):
        os.replace(os.path.join(out, name), os.path.join(previous, name))
    for name in ["adapter", "fisher", "run_config.json"][:moved]:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    state = O.inspect_output(out)
    assert state.state == "complete" and not state.staged
    assert sorted(os.listdir(out)) == ["adapter", "fisher", "metrics.json", "run_config.json"]
    assert all(read(os.path.join(out, n)) == "new" for n in ("metrics.json", "run_config.json"))


def test_checkpoints_and_resume(tmp_path):
    out = str(tmp_path / "out")
    run_files(out, finished=False, checkpoints=[2, 10])
    os.makedirs(os.path.join(out, "checkpoints", "checkpoint-12"))  # cut short while being written
    assert O.last_checkpoint(out) == os.path.join(out, "checkpoints", "checkpoint-10")
    assert O.interrupted_message(out) == "interrupted; rerun with resume=True to continue from step 10"
    O.start_run(O.plan_run(out, overwrite=False, resume=True))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-10", "checkpoint-2"]
    assert read(os.path.join(out, "fisher", "forget.safetensors")) == "old"  # reused by the resumed run


def test_interrupted_messages(tmp_path):
    out = str(tmp_path / "out")
    assert O.interrupted_message(out) == f"interrupted before anything was written to {out}; rerun to start"
    run_files(out, finished=False)
    assert O.interrupted_message(out).startswith(
        "interrupted before the first checkpoint; rerun with resume=True to train from step 0 again"
    )
    assert O.interrupted_message(out, resume_offered=False) == (
        "interrupted; rerun with overwrite=True to start again"
    )
    run_files(out, finished=True)
    assert O.interrupted_message(out) == f"interrupted; {out} still holds its finished run"
