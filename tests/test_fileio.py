"""Atomic writes: all or nothing, with the permissions a plain open() would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stylequeue.fileio import atomic_file, atomic_write_bytes


def test_write_replaces_whole_file_with_umask_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "result.png"
    atomic_write_bytes(dest, b"new")
    assert dest.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in dest.parent.iterdir()] == ["result.png"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "result.json"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(dest) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk full")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
