"""Fixtures for tests against real servers.

# ---- server fixtures (owner: storage/servers) -------------------------------------------------
Session-scoped real servers (``redis_server``, ``s3_server``), a fresh bucket per test
(``s3_bucket``), the ``STYLEQUEUE_*`` environment a subprocess (a ``celery worker``, the CLI) needs
to reach them (``service_env``), and the :class:`Settings` built from exactly that environment
(``settings``). Worker fixtures follow in their own section below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from stylequeue.settings import Settings, load_settings
from tests.servers import RedisServer, S3Server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the session (never the system one on 6379)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """MinIO if STYLEQUEUE_TEST_S3_ENDPOINT is set, else moto's threaded server on loopback."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, uniquely named bucket; emptied and removed after the test."""
    if not s3_server.running:  # a fault test that stopped the server and failed before restarting
        s3_server.start()
    name = s3_server.make_bucket()
    yield name
    if not s3_server.running:
        s3_server.start()
    s3_server.remove_bucket(name)


@pytest.fixture
def service_env(
    redis_server: RedisServer, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> dict[str, str]:
    """``STYLEQUEUE_*`` variables pointing every part of the service at the test servers.

    Merge into ``os.environ`` for subprocesses: ``env = {**os.environ, **service_env}``.
    Weights are explicit random ones (``random:0``): no test downloads or silently falls back.
    """
    if not redis_server.running:
        redis_server.start()
    root = f"s3://{s3_bucket}/stylequeue"
    return {
        "STYLEQUEUE_DATA_DIR": str(tmp_path / "data"),
        "STYLEQUEUE_BROKER_URL": redis_server.url_for(0),
        "STYLEQUEUE_RESULT_BACKEND": redis_server.url_for(1),
        "STYLEQUEUE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "STYLEQUEUE_S3_REGION": s3_server.region,
        "STYLEQUEUE_S3_ACCESS_KEY_ID": s3_server.access_key,
        "STYLEQUEUE_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "STYLEQUEUE_S3_ADDRESSING_STYLE": "path",
        "STYLEQUEUE_STORAGE_ROOT": root,
        # Inputs live anywhere in the test's own bucket; every other bucket is off limits.
        "STYLEQUEUE_ALLOWED_PREFIXES": f"s3://{s3_bucket}/",
        "STYLEQUEUE_STORAGE_RETRIES": "3",
        "STYLEQUEUE_STORAGE_BACKOFF_S": "0.05",
        "STYLEQUEUE_WEIGHTS": "random:0",
        "STYLEQUEUE_WEIGHTS_CACHE_DIR": str(tmp_path / "weights-cache"),
        "STYLEQUEUE_DEVICE": "cpu",
    }


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    """The Settings a worker started with ``service_env`` would build (and nothing else)."""
    return load_settings(environ=service_env)


# ---- end of server fixtures -------------------------------------------------------------------
