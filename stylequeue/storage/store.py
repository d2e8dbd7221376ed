"""The :class:`Storage` object: one API over ``s3://`` and ``file://``, with allow-list and retries.

Every call parses its URI and checks it against the allowed prefixes before any request. Transient
failures (connection refused, timeouts, 5xx, throttling) are retried here with exponential backoff
and jitter, ``settings.storage_retries`` times; permanent ones (missing object or bucket, access
denied, bad URI) are raised at once, since no retry could fix them.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from stylequeue.exceptions import ConfigError, StorageError, TransientStorageError
from stylequeue.settings import Settings
from stylequeue.storage.local import FileBackend
from stylequeue.storage.s3 import S3Backend
from stylequeue.storage.uri import Location, check_allowed, parse_object_uri, parse_uri

log = logging.getLogger("stylequeue.storage")
T = TypeVar("T")

MAX_BACKOFF_S = 30.0
# Jitter only ever lengthens a delay (by up to 25%): the configured backoff is a floor, so many
# workers hitting a recovering server spread out, and tests can rely on the minimum.
JITTER = 0.25
MIN_SECRET_LEN = 6


# botocore's DEBUG logs print request headers (the access key id, in ``Authorization``) and the
# string it signs; these loggers get a filter that masks every credential a Storage was given.
_LIBRARY_LOGGERS = ("botocore.endpoint", "botocore.auth", "botocore.parsers", "botocore.httpsession",
                    "botocore.retries.standard", "botocore.hooks", "urllib3.connectionpool")


class _RedactFilter(logging.Filter):
    """Masks known secrets in records from the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, ()
        return True


_redact = _RedactFilter()


def _redact_library_logs(secrets: Iterable[str]) -> None:
    _redact.secrets.update(secrets)
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _redact not in logger.filters:
            logger.addFilter(_redact)


def backoff_delay(retry: int, base_s: float) -> float:
    """Delay before retry number ``retry`` (0-based): ``base * 2**retry``, capped, plus jitter."""
    return min(MAX_BACKOFF_S, base_s * 2**retry) * (1.0 + random.uniform(0.0, JITTER))


class Storage:
    """Object storage by URI. Build it with :func:`open_storage`; safe to share between threads."""

    def __init__(
        self, settings: Settings, extra_prefixes: Iterable[str] = (),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._retries = max(0, settings.storage_retries)
        self._backoff_s = max(0.0, settings.storage_backoff_s)
        self._sleep = sleep
        self._endpoint = settings.s3_endpoint_url or "(AWS default)"
        # Strings this short are not real keys, and masking them would garble every message.
        self._secrets = [s for s in (settings.s3_secret_access_key, settings.s3_access_key_id)
                         if len(s) >= MIN_SECRET_LEN]
        _redact_library_logs(self._secrets)
        self._prefixes = [parse_prefix(p) for p in (*settings.allowed_prefix_list, *extra_prefixes)]
        self._s3 = S3Backend(settings, self.scrub)
        self._file = FileBackend()

    def __repr__(self) -> str:
        allowed = [p.uri for p in self._prefixes]
        return f"Storage(s3_endpoint={self._endpoint!r}, allowed={allowed!r})"

    @property
    def allowed_prefixes(self) -> list[str]:
        return [p.uri for p in self._prefixes]

    @property
    def s3_client(self) -> object:
        """The underlying boto3 client (tests hook its events to count requests)."""
        return self._s3.client

    def scrub(self, text: str) -> str:
        """``text`` with every configured credential replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def check(self, uri: str, *, obj: bool = True) -> Location:
        """Parse ``uri`` (one object's, unless ``obj`` is False: a prefix) and check the allow-list;
        raises without any request being made."""
        loc = parse_object_uri(uri) if obj else parse_uri(uri)
        check_allowed(loc, uri, self._prefixes)
        return loc

    def get_bytes(self, uri: str) -> bytes:
        loc = self.check(uri)
        backend = self._backend(loc)
        return self._retrying("get", uri, lambda: backend.get_bytes(loc))

    def get_to_file(self, uri: str, dest: str | Path) -> Path:
        """Download ``uri`` to ``dest`` (renamed into place when complete); returns ``dest``."""
        loc, path = self.check(uri), Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = self._backend(loc)
        self._retrying("download", uri, lambda: backend.get_to_file(loc, path))
        return path

    def put_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Write ``data``; atomic from a reader's view (S3 PUT, or temp file + rename)."""
        loc = self.check(uri)
        backend = self._backend(loc)
        self._retrying("put", uri, lambda: backend.put_bytes(loc, bytes(data), content_type))

    def exists(self, uri: str) -> bool:
        loc = self.check(uri)
        backend = self._backend(loc)
        return self._retrying("exists", uri, lambda: backend.exists(loc))

    def list(self, prefix: str) -> list[str]:
        """Every object URI starting with ``prefix`` (a string prefix, as in S3), sorted."""
        loc = self.check(prefix, obj=False)
        backend = self._backend(loc)
        return self._retrying("list", prefix, lambda: backend.list(loc))

    def delete(self, uri: str) -> None:
        """Remove one object; removing one that does not exist is not an error."""
        loc = self.check(uri)
        backend = self._backend(loc)
        self._retrying("delete", uri, lambda: backend.delete(loc))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many there were."""
        uris = self.list(prefix)
        loc = self.check(prefix, obj=False)
        if loc.scheme == "s3":
            keys = [parse_uri(u).key for u in uris]
            self._retrying("delete", prefix, lambda: self._s3.delete_many(loc, keys))
        else:
            paths = [parse_uri(u).path for u in uris]
            self._retrying("delete", prefix, lambda: self._file.delete_many(paths))
        return len(uris)

    def presign(self, uri: str, expires_s: int) -> str:
        """A URL anyone can GET for ``expires_s`` seconds (``s3://`` only)."""
        if expires_s <= 0:
            raise ConfigError(f"presigned URL lifetime must be positive, got {expires_s} s")
        loc = self.check(uri)
        return self._backend(loc).presign(loc, expires_s)

    def _backend(self, loc: Location) -> S3Backend | FileBackend:
        return self._s3 if loc.scheme == "s3" else self._file

    def _retrying(self, what: str, uri: str, op: Callable[[], T]) -> T:
        retry = 0
        while True:
            try:
                return op()
            except TransientStorageError as exc:
                message = self.scrub(str(exc))
                if retry >= self._retries:
                    raise TransientStorageError(
                        f"{message} (gave up after {retry + 1} attempts; is the storage endpoint "
                        f"up? STYLEQUEUE_STORAGE_RETRIES sets the budget)") from None
                delay = backoff_delay(retry, self._backoff_s)
                log.warning("storage %s %s failed: %s; retry %d/%d in %.2fs",
                            what, uri, message, retry + 1, self._retries, delay)
                self._sleep(delay)
                retry += 1
            except StorageError as exc:
                if self._secrets and any(s in str(exc) for s in self._secrets):
                    raise type(exc)(self.scrub(str(exc))) from None
                raise


def parse_prefix(prefix: str) -> Location:
    """An allowed prefix from the settings; a bad one is the operator's ConfigError."""
    try:
        return parse_uri(prefix)
    except StorageError as exc:
        raise ConfigError(
            f"bad storage prefix {prefix!r} in STYLEQUEUE_STORAGE_ROOT/STYLEQUEUE_ALLOWED_PREFIXES: {exc}"
        ) from None


def open_storage(settings: Settings, extra_prefixes: Iterable[str] = ()) -> Storage:
    """The :class:`Storage` for ``settings``; ``extra_prefixes`` widen its allow-list."""
    return Storage(settings, extra_prefixes=extra_prefixes)


__all__ = ["Storage", "open_storage", "backoff_delay"]
