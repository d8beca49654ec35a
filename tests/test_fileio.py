"""Atomic writes: the old file survives a failed write, and no temporary is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from pybilayer.errors import MediaError
from pybilayer.fileio import atomic_path, atomic_write_bytes


def test_failed_replace_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.plan"
    target.write_bytes(b"old plan")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(MediaError, match="disk full"):
        atomic_write_bytes(target, b"new plan")
    assert target.read_bytes() == b"old plan"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.plan"]


def test_exception_while_writing_discards_the_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_replaces_and_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write_bytes(target, b"1")
    atomic_write_bytes(target, b"22")
    assert target.read_bytes() == b"22"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_final_file_gets_the_usual_mode_not_mkstemps_private_one(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "m.bin", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.bin").stat().st_mode) == 0o644


def test_missing_folder_is_a_clear_error_without_make_parents(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        atomic_path(tmp_path / "nope" / "x.bin")
