"""Atomic local writes: a reader sees the old file or the whole new one, never half of either.

Every local file stylequeue writes (results, weights, cached objects) goes through here, so a
crash or a full disk mid-write leaves at most a hidden temp file, never a truncated result.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def _mode_from_umask() -> int:
    # mkstemp creates files 0600; a result should get the permissions open() would give it.
    # Read once at import: os.umask is process-wide and not safe to toggle from worker threads.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _mode_from_umask()


@contextmanager
def atomic_path(dest: str | Path, suffix: str = ".part") -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it over ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _MODE)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(dest: str | Path, suffix: str = ".part") -> Iterator[BinaryIO]:
    """Yield a binary file to write; it becomes ``dest`` (fsynced) only if the block succeeds."""
    with atomic_path(dest, suffix) as tmp, open(tmp, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_file(dest) as fh:
        fh.write(data)
