"""Atomic writes (fastunlearn._io): the modes of what they write, and refusals."""

import os
import stat

import pytest

from fastunlearn import _io


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    """Run the test under a given umask (restored afterwards); _io reads it afresh."""
    previous = os.umask(request.param)
    _io.umask.cache_clear()
    yield request.param
    os.umask(previous)
    _io.umask.cache_clear()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_directories_get_the_modes_of_the_umask(umask, tmp_path):
    assert _io.umask() == umask
    _io.write_json(tmp_path / "m.json", {"a": 1})
    _io.atomic_file(tmp_path / "f.bin", lambda tmp: open(tmp, "wb").close())

    def fill(tmp):
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "w.safetensors"), "w") as handle:
            handle.write("x")
        os.chmod(os.path.join(tmp, "sub", "w.safetensors"), 0o600)  # as a tempfile-based writer leaves it

    _io.write_dir(tmp_path / "adapter", fill)
    for path in ("m.json", "f.bin", "adapter/sub/w.safetensors"):
        assert mode(tmp_path / path) == 0o666 & ~umask, path
    for path in ("adapter", "adapter/sub"):
        assert mode(tmp_path / path) == 0o777 & ~umask, path


def test_a_directory_is_not_replaced_by_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(IsADirectoryError, match="is a directory; give the path of a file"):
        _io.write_json(tmp_path / "out", {})
    assert (tmp_path / "out" / "keep").read_text() == "x"
    assert os.listdir(tmp_path) == ["out"]  # no temporary left behind
    (tmp_path / "file").write_text("y")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        _io.write_dir(tmp_path / "file", lambda tmp: None)
    assert (tmp_path / "file").read_text() == "y"
