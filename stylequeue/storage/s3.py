"""``s3://`` objects through boto3, on AWS or any S3-compatible server (MinIO, moto).

One attempt per call: botocore's own retries are off (``max_attempts=1``) because
:class:`stylequeue.storage.Storage` retries transient errors itself, with one budget and one log
line per retry. Every botocore error is mapped to a stylequeue exception here, with a message that
never carries credentials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

from stylequeue.exceptions import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from stylequeue.fileio import atomic_file
from stylequeue.settings import Settings
from stylequeue.storage.uri import Location

T = TypeVar("T")

# Small enough that a dead endpoint fails fast and our own retry loop takes over; a read timeout
# bounds one socket read, not a whole download, so large weights files are fine.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
LIST_PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 response

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "InvalidToken", "ExpiredToken", "AccountProblem"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
              "ServiceUnavailable", "TooManyRequests", "RequestLimitExceeded"}


def make_client(settings: Settings) -> Any:
    """A boto3 S3 client for ``settings``; empty keys mean boto3's default credential chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": settings.s3_addressing_style},
        # SigV4 everywhere, presigned URLs included (boto3 would presign with SigV2, which newer
        # AWS regions reject).
        signature_version="s3v4",
        # MinIO and most S3-compatible servers reject the CRC trailers boto3 >= 1.36 sends by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    kwargs: dict[str, Any] = {"region_name": settings.s3_region or None, "config": config}
    if settings.s3_endpoint_url:
        kwargs["endpoint_url"] = settings.s3_endpoint_url
    if settings.s3_access_key_id or settings.s3_secret_access_key:
        kwargs["aws_access_key_id"] = settings.s3_access_key_id
        kwargs["aws_secret_access_key"] = settings.s3_secret_access_key
    return boto3.session.Session().client("s3", **kwargs)


class S3Backend:
    """Single-attempt S3 operations with error mapping. Thread-safe (boto3 clients are)."""

    def __init__(self, settings: Settings, scrub: Callable[[str], str]) -> None:
        self._settings = settings
        self._scrub = scrub
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self._settings)
        return self._client

    def get_bytes(self, loc: Location) -> bytes:
        def op() -> bytes:
            body = self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._call(loc, op)

    def get_to_file(self, loc: Location, dest: Path) -> None:
        def op() -> None:
            body = self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
            try:
                with atomic_file(dest) as fh:
                    for chunk in body.iter_chunks(CHUNK_BYTES):
                        fh.write(chunk)
            finally:
                body.close()

        self._call(loc, op)

    def put_bytes(self, loc: Location, data: bytes, content_type: str | None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        # A PUT replaces the object atomically: readers see the old or the new bytes, never a mix.
        self._call(loc, lambda: self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **extra))

    def exists(self, loc: Location) -> bool:
        def op() -> bool:
            try:
                self.client.head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except Exception as exc:  # noqa: BLE001 - mapped just below
                if _code(exc) in _NOT_FOUND:
                    return False
                raise

        return self._call(loc, op)

    def list(self, loc: Location) -> list[str]:
        def op() -> list[str]:
            keys: list[str] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=loc.key, PaginationConfig={"PageSize": LIST_PAGE_SIZE})
            for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
            return [f"s3://{loc.bucket}/{key}" for key in sorted(keys)]

        return self._call(loc, op)

    def delete(self, loc: Location) -> None:
        self._call(loc, lambda: self.client.delete_object(Bucket=loc.bucket, Key=loc.key))

    def delete_many(self, bucket_loc: Location, keys: list[str]) -> None:
        def op() -> None:
            for start in range(0, len(keys), 1000):  # the DeleteObjects limit
                batch = [{"Key": key} for key in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=bucket_loc.bucket, Delete={"Objects": batch, "Quiet": True})

        self._call(bucket_loc, op)

    def presign(self, loc: Location, expires_s: int) -> str:
        params = {"Bucket": loc.bucket, "Key": loc.key}
        return self._call(loc, lambda: self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=int(expires_s)))

    def _call(self, loc: Location, op: Callable[[], T]) -> T:
        try:
            return op()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every botocore failure is mapped
            _raise_mapped(exc, loc, self._scrub)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _raise_mapped(exc: Exception, loc: Location, scrub: Callable[[str], str]) -> NoReturn:
    """Turn a botocore/urllib3 exception into a stylequeue one. ``from None``: the original's
    text may quote request details, and what we keep of it is scrubbed of credentials."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError as BotoConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
        SSLError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    uri = loc.uri
    detail = scrub(str(exc))
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        if code == "NoSuchBucket":
            raise ObjectNotFoundError(
                f"bucket {loc.bucket!r} does not exist (for {uri}); create it or fix the URI") from None
        if code in _NOT_FOUND:
            raise ObjectNotFoundError(f"no object at {uri}; check the key and that it was uploaded") from None
        if code in _DENIED or status == 403:
            raise AccessDeniedError(
                f"access denied to {uri} ({code}); check the S3 credentials and the bucket policy") from None
        if code in _TRANSIENT or status >= 500 or status == 429:
            raise TransientStorageError(f"S3 is unavailable for {uri}: {code} (HTTP {status})") from None
        raise StorageError(f"S3 refused the request for {uri}: {detail}") from None
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        raise AccessDeniedError(
            "no usable S3 credentials: set STYLEQUEUE_S3_ACCESS_KEY_ID and "
            "STYLEQUEUE_S3_SECRET_ACCESS_KEY, or the standard AWS credential chain") from None
    if isinstance(exc, SSLError):
        raise StorageError(f"TLS failed talking to S3 for {uri}: {detail}") from None
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error, OSError)):
        raise TransientStorageError(f"cannot reach S3 for {uri}: {detail}") from None
    if isinstance(exc, BotoCoreError):
        raise StorageError(f"S3 request for {uri} failed: {detail}") from None
    raise exc
