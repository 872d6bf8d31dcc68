"""Atomic writes: a file or directory appears complete at its path, or the old one stays."""

from __future__ import annotations

import os
import stat

import pytest

from alpamayo_jax.io.atomic import atomic_directory, write_atomically


def test_write_atomically_writes_and_replaces(tmp_path):
    path = tmp_path / "out.bin"
    write_atomically(path, lambda file: file.write(b"first"))
    write_atomically(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_write_atomically_uses_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomically(tmp_path / "out.bin", lambda file: file.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644  # not tempfile's 0600


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def failing(file):
        file.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, failing)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_directory_appears_complete(tmp_path):
    out = tmp_path / "nested" / "bundle"
    with atomic_directory(out) as staging:
        assert staging.parent == out.parent and not out.exists()
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert os.listdir(out.parent) == ["bundle"]


def test_atomic_directory_refuses_an_existing_one_before_any_work(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass force=True"), atomic_directory(out):
        raise AssertionError("the body must not run")


def test_atomic_directory_force_replaces_and_failure_keeps_the_old_one(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["bundle"]
    with atomic_directory(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["bundle"]
