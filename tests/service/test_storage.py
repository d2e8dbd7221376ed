"""stylequeue.storage against a real S3 HTTP server (moto, or MinIO) and the local filesystem."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from stylequeue.exceptions import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    UnsupportedURIError,
)
from stylequeue.settings import Settings
from stylequeue.storage import Storage, open_storage
from testbed.s3 import S3Server


@pytest.fixture(params=["s3", "file"])
def store(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Storage:
    """The same tests over both backends."""
    if request.param == "file":
        settings = settings.replace(storage_root=f"file://{tmp_path}/objects", allowed_prefixes="")
    return open_storage(settings)


@pytest.fixture
def root(store: Storage) -> str:
    return store.allowed_prefixes[0]


class RequestCounter:
    """Counts the HTTP requests a boto3 client sends (botocore's before-send event)."""

    def __init__(self, store: Storage) -> None:
        self.count = 0
        store.s3_client.meta.events.register("before-send.s3", self._hook)  # type: ignore[attr-defined]

    def _hook(self, **_: Any) -> None:
        self.count += 1


def test_round_trip_list_exists_delete(store: Storage, root: str) -> None:
    a, b, other = f"{root}/jobs/j1/result.png", f"{root}/jobs/j1/previews/iter_000010.png", f"{root}/jobs/j2/x"
    store.put_bytes(a, b"\x89PNG data", content_type="image/png")
    store.put_bytes(b, b"preview")
    store.put_bytes(other, b"x")
    assert store.get_bytes(a) == b"\x89PNG data"
    assert store.exists(a) and not store.exists(f"{root}/jobs/j1/nothing")
    assert store.list(f"{root}/jobs/j1/") == [b, a]
    assert store.list(f"{root}/jobs/j") == [b, a, other]  # a string prefix, as in S3
    store.put_bytes(a, b"replaced")  # overwrite in place
    assert store.get_bytes(a) == b"replaced"
    store.delete(b)
    store.delete(b)  # deleting a missing object is fine (idempotent)
    assert store.list(f"{root}/jobs/j1/") == [a]
    assert store.delete_prefix(f"{root}/jobs/") == 2
    assert store.list(f"{root}/") == []


def test_list_follows_every_page(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from stylequeue.storage import s3

    monkeypatch.setattr(s3, "LIST_PAGE_SIZE", 3)  # S3 pages at 1000; 3 shows the same loop quickly
    store = open_storage(settings)
    prefix = f"{settings.resolved_storage_root}/many/"
    for i in range(8):
        store.put_bytes(f"{prefix}{i:02d}", b"")
    counter = RequestCounter(store)
    listed = store.list(prefix)
    assert listed == [f"{prefix}{i:02d}" for i in range(8)]
    assert counter.count == 3  # pages of 3 + 3 + 2
    assert store.delete_prefix(prefix) == 8 and store.list(prefix) == []


def test_get_to_file(store: Storage, root: str, tmp_path: Path) -> None:
    store.put_bytes(f"{root}/blob", b"z" * 3_000_000)
    dest = store.get_to_file(f"{root}/blob", tmp_path / "dl" / "blob.bin")
    assert dest.read_bytes() == b"z" * 3_000_000
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]  # no temp file left behind


def test_missing_key_fails_at_once_without_retry(settings: Settings) -> None:
    store = open_storage(settings.replace(storage_retries=4, storage_backoff_s=0.5))
    counter = RequestCounter(store)
    uri = f"{settings.resolved_storage_root}/no/such/key.png"
    started = time.monotonic()
    with pytest.raises(ObjectNotFoundError, match="no object at s3://.*/no/such/key.png"):
        store.get_bytes(uri)
    assert counter.count == 1
    assert time.monotonic() - started < 0.5


def test_missing_file_object(tmp_path: Path, settings: Settings) -> None:
    store = open_storage(settings.replace(storage_root=f"file://{tmp_path}"))
    with pytest.raises(ObjectNotFoundError, match="no object at file://"):
        store.get_bytes(f"file://{tmp_path}/missing.png")


def test_missing_bucket(settings: Settings) -> None:
    store = open_storage(settings.replace(allowed_prefixes="s3://sq-no-such-bucket-here/"))
    counter = RequestCounter(store)
    with pytest.raises(ObjectNotFoundError, match="bucket 'sq-no-such-bucket-here' does not exist"):
        store.get_bytes("s3://sq-no-such-bucket-here/a.png")
    assert counter.count == 1


@pytest.mark.parametrize(
    "uri",
    [
        "s3://someone-elses-bucket/secret.png",
        "s3://{bucket}-evil/x",  # a bucket whose name merely starts with ours
        "s3://{bucket}/../{bucket}-evil/x",
    ],
)
def test_other_bucket_refused_before_any_request(settings: Settings, s3_bucket: str, uri: str) -> None:
    store = open_storage(settings)
    counter = RequestCounter(store)
    with pytest.raises(AccessDeniedError):
        store.get_bytes(uri.format(bucket=s3_bucket))
    with pytest.raises(AccessDeniedError):
        store.put_bytes(uri.format(bucket=s3_bucket), b"x")
    assert counter.count == 0


def test_prefix_boundary(tmp_path: Path, settings: Settings) -> None:
    store = open_storage(settings.replace(storage_root=f"file://{tmp_path}/jobs", allowed_prefixes=""))
    store.put_bytes(f"file://{tmp_path}/jobs/a", b"ok")
    with pytest.raises(AccessDeniedError, match="allowed prefixes: file://"):
        store.put_bytes(f"file://{tmp_path}/jobs-evil/a", b"no")


@pytest.mark.parametrize("suffix", ["/../outside.txt", "/a/../../outside.txt", "/%2e%2e/outside.txt"])
def test_file_dotdot_out_of_root_refused(tmp_path: Path, settings: Settings, suffix: str) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    store = open_storage(settings.replace(storage_root=f"file://{tmp_path}/root", allowed_prefixes=""))
    with pytest.raises(AccessDeniedError, match=r"'\.\.' climbs out|outside the storage"):
        store.get_bytes(f"file://{tmp_path}/root{suffix}")


def test_file_dotdot_inside_root_allowed(tmp_path: Path, settings: Settings) -> None:
    store = open_storage(settings.replace(storage_root=f"file://{tmp_path}/root", allowed_prefixes=""))
    store.put_bytes(f"file://{tmp_path}/root/a/b.txt", b"in")
    assert store.get_bytes(f"file://{tmp_path}/root/a/../a/b.txt") == b"in"


@pytest.mark.parametrize("uri", ["file://relative/path.png", "file:relative.png", "relative/path.png"])
def test_relative_file_uri_refused(settings: Settings, uri: str) -> None:
    with pytest.raises((AccessDeniedError, UnsupportedURIError), match="absolute"):
        open_storage(settings).get_bytes(uri)


@pytest.mark.parametrize("uri", ["http://example.com/a.png", "gs://bucket/a.png", "ftp://x/y"])
def test_unknown_scheme(settings: Settings, uri: str) -> None:
    with pytest.raises(UnsupportedURIError, match=r"s3://bucket/key and file:///absolute/path"):
        open_storage(settings).get_bytes(uri)


def test_presign_round_trip_and_expiry(settings: Settings) -> None:
    store = open_storage(settings)
    uri = f"{settings.resolved_storage_root}/share/result.png"
    store.put_bytes(uri, b"shared bytes", content_type="image/png")
    # A plain HTTP client that ignores proxy variables (urlopen's global opener caches whatever
    # proxies the environment had when it was first used, possibly in another test).
    http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with http.open(store.presign(uri, expires_s=60), timeout=10) as resp:
        assert resp.read() == b"shared bytes"
    short = store.presign(uri, expires_s=1)
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError) as info:
        http.open(short, timeout=10)
    assert info.value.code == 403


def test_presign_file_is_a_clear_error(tmp_path: Path, settings: Settings) -> None:
    store = open_storage(settings.replace(storage_root=f"file://{tmp_path}", allowed_prefixes=""))
    with pytest.raises(UnsupportedURIError, match="only for s3://"):
        store.presign(f"file://{tmp_path}/a.png", 60)


@pytest.fixture
def outage(s3_server: S3Server) -> Iterator[S3Server]:
    """Yields with the S3 server stopped; always restarts it afterwards."""
    s3_server.stop()
    try:
        yield s3_server
    finally:
        s3_server.start()


def test_transient_failure_retried_with_backoff_then_raised(
    settings: Settings, outage: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    retries, backoff = 3, 0.1
    store = open_storage(settings.replace(storage_retries=retries, storage_backoff_s=backoff))
    counter = RequestCounter(store)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="stylequeue.storage"):
        with pytest.raises(TransientStorageError, match="gave up after 4 attempts"):
            store.get_bytes(f"{settings.resolved_storage_root}/a.png")
    elapsed = time.monotonic() - started
    assert counter.count == retries + 1
    assert elapsed >= backoff * (1 + 2 + 4)  # 0.1 + 0.2 + 0.4: the backoff doubles, jitter only adds
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == retries


def test_recovers_when_server_returns_within_retry_window(
    settings: Settings, s3_server: S3Server
) -> None:
    import threading

    store = open_storage(settings.replace(storage_retries=6, storage_backoff_s=0.2))
    uri = f"{settings.resolved_storage_root}/survives.txt"
    store.put_bytes(uri, b"still here")
    s3_server.stop()
    restart = threading.Timer(0.7, s3_server.start)
    restart.start()
    try:
        assert store.get_bytes(uri) == b"still here"
    finally:
        restart.join()
        s3_server.start()


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")])
def test_server_errors_and_throttling_are_retried(
    settings: Settings, s3_server: S3Server, status: int, code: str
) -> None:
    if s3_server.mode != "thread":
        pytest.skip("HTTP fault injection needs the threaded moto server")
    store = open_storage(settings.replace(storage_retries=3, storage_backoff_s=0.01))
    uri = f"{settings.resolved_storage_root}/flaky.txt"
    store.put_bytes(uri, b"eventually")
    counter = RequestCounter(store)
    s3_server.fail_next(2, status, code)
    assert store.get_bytes(uri) == b"eventually"
    assert counter.count == 3
    s3_server.fail_next(10, status, code)
    with pytest.raises(TransientStorageError, match=rf"{code} \(HTTP {status}\).*gave up after 4 attempts"):
        store.put_bytes(uri, b"x")
    assert counter.count == 3 + 4


def test_access_denied_from_server_is_not_retried(settings: Settings, s3_server: S3Server) -> None:
    if s3_server.mode != "thread":
        pytest.skip("HTTP fault injection needs the threaded moto server")
    store = open_storage(settings.replace(storage_retries=3, storage_backoff_s=0.01))
    counter = RequestCounter(store)
    s3_server.fail_next(1, 403, "AccessDenied")
    with pytest.raises(AccessDeniedError, match="check the S3 credentials and the bucket policy"):
        store.get_bytes(f"{settings.resolved_storage_root}/x")
    assert counter.count == 1


def test_secrets_never_in_errors_repr_or_logs(
    settings: Settings, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    secret, key_id = settings.s3_secret_access_key, settings.s3_access_key_id
    assert secret and key_id
    store = open_storage(settings.replace(storage_retries=2, storage_backoff_s=0.01))
    root = settings.resolved_storage_root
    seen: list[str] = [repr(store), str(store), repr(settings), str(settings)]
    failing = [lambda: store.get_bytes(f"{root}/missing"), lambda: store.get_bytes("s3://not-allowed/x"),
               lambda: store.get_bytes("nope://x")]
    with caplog.at_level(logging.DEBUG):  # botocore's DEBUG logs print request headers
        store.put_bytes(f"{root}/x", b"x")
        seen.append(store.presign(f"{root}/x", 60).split("X-Amz-Credential")[0])  # the URL carries the key id by design
        s3_server.stop()
        try:
            failing.append(lambda: store.get_bytes(f"{root}/x"))
            for call in failing:
                with pytest.raises(StorageError) as info:
                    call()
                seen += [str(info.value), repr(info.value)]
                # Nothing chained: a traceback shows our message only, never botocore's raw one.
                assert info.value.__cause__ is None
                assert info.value.__context__ is None or info.value.__suppress_context__
        finally:
            s3_server.start()
    logged = [r.getMessage() for r in caplog.records]
    assert any("retry" in m for m in logged) and any("Authorization" in m for m in logged)
    for text in seen + logged:
        assert secret not in text and key_id not in text


def test_bad_credentials_are_access_denied_without_echoing_them(
    settings: Settings, s3_server: S3Server
) -> None:
    if s3_server.mode != "external":
        pytest.skip("moto accepts any credentials unless its IAM emulation is on; MinIO checks them")
    bad = settings.replace(s3_secret_access_key="wrong-secret-xyz", s3_access_key_id="WRONGKEYID")
    with pytest.raises(AccessDeniedError) as info:
        open_storage(bad).get_bytes(f"{settings.resolved_storage_root}/x")
    assert "wrong-secret-xyz" not in str(info.value) and "WRONGKEYID" not in str(info.value)


def test_weights_fetched_from_s3_through_registry_and_cached(settings: Settings, tmp_path: Path) -> None:
    import torch

    from stylequeue.engine import weights as engine_weights
    from stylequeue.storage import install_weights_fetchers

    torch.set_num_threads(1)
    # A real VGG19 features file, stored as float16 to halve it (the loader converts to float32).
    state = engine_weights.load_weights("random:3").state_dict
    local = tmp_path / "vgg19-features.pth"
    torch.save({k: v.half() for k, v in state.items()}, local)
    models = f"s3://{settings.resolved_storage_root.split('/')[2]}/models/vgg19-features.pth"
    # The deployment's weights URI is allowed even outside the job prefixes.
    settings = settings.replace(weights=models, allowed_prefixes="")
    store = install_weights_fetchers(settings)
    store.put_bytes(models, local.read_bytes())
    counter = RequestCounter(store)
    cache = tmp_path / "cache"

    loaded = engine_weights.load_weights(models, cache_dir=str(cache))
    assert loaded.info.source == models and not loaded.info.random
    assert torch.allclose(loaded.state_dict["0.weight"], state["0.weight"].half().float())
    assert counter.count == 1 and len(list(cache.iterdir())) == 1

    # A new worker process: the disk cache serves it, no request.
    again = engine_weights.load_weights(models, cache_dir=str(cache))
    assert again.info.sha256 == loaded.info.sha256
    assert counter.count == 1


def test_weights_outside_allow_list_refused(settings: Settings, tmp_path: Path) -> None:
    from stylequeue.engine import weights as engine_weights
    from stylequeue.storage import install_weights_fetchers

    install_weights_fetchers(settings)
    with pytest.raises(AccessDeniedError):
        engine_weights.load_weights("s3://another-bucket/vgg19.pth", cache_dir=str(tmp_path))
