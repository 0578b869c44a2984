"""Atomic writes (engine/files/atomic.py): a whole new file or the old one, the usual mode, no temp file left."""

import os

import pytest

from ddengine.files.atomic import OutputError, atomic_write, atomic_write_via


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(tmp_path / "a.bin", b"x")
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_a_failing_writer_leaves_no_temp_file(tmp_path):
    def half_then_fail(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        atomic_write_via(tmp_path / "x.png", half_then_fail)
    assert os.listdir(tmp_path) == []


def test_atomic_write_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(OutputError, match=r"cannot write .*missing/a.bin"):
        atomic_write(tmp_path / "missing" / "a.bin", b"x")
