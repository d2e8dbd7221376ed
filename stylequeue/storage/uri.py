"""Storage URIs (``s3://bucket/key``, ``file:///abs/path``) and the allow-list.

Every URI is parsed and checked against the deployment's allowed prefixes before any request is
made, so a job that names another bucket, or a ``file://`` path that climbs out of its root with
``..``, is refused without touching storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote, urlsplit

from stylequeue.exceptions import AccessDeniedError, UnsupportedURIError

@dataclass(frozen=True)
class Location:
    """A parsed URI. For ``s3``: ``bucket`` and ``key``; for ``file``: ``path`` (absolute, normalised)."""

    scheme: str
    bucket: str = ""
    key: str = ""
    path: str = ""

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}"
        return f"file://{self.path}"

    def within(self, prefix: "Location") -> bool:
        """True when this location is ``prefix`` itself or lies below it (on a ``/`` boundary)."""
        if self.scheme != prefix.scheme:
            return False
        if self.scheme == "s3":
            return self.bucket == prefix.bucket and _under(self.key, prefix.key)
        return _under(self.path, prefix.path)


def _under(child: str, parent: str) -> bool:
    # "jobs" allows "jobs" and "jobs/x", never "jobs-evil/x"; an empty parent allows everything.
    if not parent or parent.endswith("/"):
        return child.startswith(parent)
    return child == parent or child.startswith(parent + "/")


def parse_uri(uri: str) -> Location:
    """Parse ``uri`` or raise :class:`UnsupportedURIError` / :class:`AccessDeniedError`."""
    if not isinstance(uri, str) or "://" not in uri:
        raise UnsupportedURIError(
            f"{uri!r} is not a storage URI: use s3://bucket/key or file:///absolute/path"
        )
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "s3":
        return _parse_s3(uri)
    if scheme == "file":
        return _parse_file(uri)
    raise UnsupportedURIError(
        f"unsupported URI scheme {scheme!r} in {uri!r}: stylequeue reads and writes "
        f"s3://bucket/key and file:///absolute/path"
    )


def parse_object_uri(uri: str) -> Location:
    """Parse a URI that must name one object (an image, a weights file), not a bucket or folder."""
    loc = parse_uri(uri)
    name = loc.key if loc.scheme == "s3" else loc.path
    if not name or name.endswith("/"):
        what = "a bucket" if loc.scheme == "s3" and not loc.key else "a folder"
        raise UnsupportedURIError(
            f"{uri!r} names {what}, not an object: give the object's whole key, for example "
            f"{'s3://bucket/in/cat.png' if loc.scheme == 's3' else 'file:///data/in/cat.png'}"
        )
    return loc


def _parse_s3(uri: str) -> Location:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UnsupportedURIError(f"{uri!r} names no bucket: use s3://bucket/key")
    # S3 keys are literal strings, but proxies and some S3-compatible servers normalise "..":
    # refuse it rather than guess which object would be reached.
    if ".." in key.split("/"):
        raise AccessDeniedError(f"{uri!r} contains '..': name the object without relative segments")
    return Location("s3", bucket=bucket, key=key)


def _parse_file(uri: str) -> Location:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise AccessDeniedError(
            f"{uri!r} is a relative or remote file URI: use file:///absolute/path (three slashes)"
        )
    raw = unquote(parts.path)
    if not raw.startswith("/"):
        raise AccessDeniedError(f"{uri!r} is relative: use file:///absolute/path")
    # realpath resolves ".." and symlinks, so the allow-list sees where the file really is.
    path = os.path.realpath(raw)
    if raw.endswith("/") and not path.endswith("/"):
        path += "/"
    return Location("file", path=path)


def check_allowed(location: Location, uri: str, prefixes: Iterable[Location]) -> None:
    """Raise :class:`AccessDeniedError` unless ``location`` lies under one of ``prefixes``."""
    allowed = list(prefixes)
    if any(location.within(prefix) for prefix in allowed):
        return
    names = ", ".join(p.uri for p in allowed) or "(none)"
    hint = " ('..' climbs out of the allowed root)" if ".." in uri else ""
    raise AccessDeniedError(
        f"{uri!r} is outside the storage this deployment allows{hint}; allowed prefixes: {names}. "
        f"Use a URI under one of them, or ask the operator to add a prefix to "
        f"STYLEQUEUE_ALLOWED_PREFIXES"
    )
