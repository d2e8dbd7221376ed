"""``file://`` objects: a directory tree on one machine, for the zero-server default and tests.

Writes go to a temporary file in the same directory and are renamed into place (``os.replace`` is
atomic on POSIX), so a reader sees the old object or the new one, never half of one; temporary
files are hidden from ``list``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from stylequeue.exceptions import ObjectNotFoundError, StorageError, UnsupportedURIError
from stylequeue.fileio import atomic_file
from stylequeue.storage.uri import Location

_TMP_SUFFIX = ".part"


class FileBackend:
    """Filesystem operations with the same errors as :class:`S3Backend`."""

    def get_bytes(self, loc: Location) -> bytes:
        try:
            return Path(loc.path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(f"no object at {loc.uri}; check the path") from None
        except OSError as exc:
            raise StorageError(f"cannot read {loc.uri}: {exc.strerror}") from None

    def get_to_file(self, loc: Location, dest: Path) -> None:
        if not Path(loc.path).is_file():
            raise ObjectNotFoundError(f"no object at {loc.uri}; check the path")
        def copy(fh: BinaryIO) -> None:
            with open(loc.path, "rb") as src:
                shutil.copyfileobj(src, fh)

        _atomic_write(dest, copy, loc.uri)

    def put_bytes(self, loc: Location, data: bytes, content_type: str | None) -> None:
        del content_type  # a filesystem has nowhere to keep it
        _atomic_write(Path(loc.path), lambda fh: fh.write(data), loc.uri)

    def exists(self, loc: Location) -> bool:
        return Path(loc.path).is_file()

    def list(self, loc: Location) -> list[str]:
        # S3 semantics: a prefix is a string prefix ("jobs/a" matches "jobs/ab/x"), except that a
        # prefix naming a directory lists that directory only (no walk of its parent's siblings).
        prefix = loc.path
        if os.path.isdir(prefix) and not prefix.endswith("/"):
            prefix += "/"
        base = Path(prefix if prefix.endswith("/") else os.path.dirname(prefix))
        if not base.is_dir():
            return []
        found = []
        for root, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(root, name)
                if path.startswith(prefix) and not _is_temp(name):
                    found.append(f"file://{path}")
        return sorted(found)

    def delete(self, loc: Location) -> None:
        try:
            Path(loc.path).unlink(missing_ok=True)
        except IsADirectoryError:
            raise StorageError(f"{loc.uri} is a directory; delete_prefix removes a tree") from None

    def delete_many(self, paths: list[str]) -> None:
        parents = set()
        for path in paths:
            Path(path).unlink(missing_ok=True)
            parents.add(Path(path).parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            _prune_empty(parent)

    def presign(self, loc: Location, expires_s: int) -> str:
        raise UnsupportedURIError(
            f"cannot presign {loc.uri}: presigned URLs exist only for s3:// objects; "
            f"point STYLEQUEUE_STORAGE_ROOT at S3 (or MinIO) to share results by URL"
        )


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def _atomic_write(dest: Path, write: Callable[[BinaryIO], object], uri: str) -> None:
    try:
        with atomic_file(dest, suffix=_TMP_SUFFIX) as fh:
            write(fh)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc.strerror}") from None


def _prune_empty(directory: Path) -> None:
    try:
        directory.rmdir()  # only succeeds when empty, which is the point
    except OSError:
        pass
