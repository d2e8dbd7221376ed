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
from testbed.env import service_env_for
from testbed.redis import RedisServer
from testbed.s3 import S3Server


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
    Redis databases 0 (broker) and 1 (results); see :func:`testbed.env.service_env_for`.
    """
    if not redis_server.running:
        redis_server.start()
    return service_env_for(redis_server, s3_server, s3_bucket, tmp_path)


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    """The Settings a worker started with ``service_env`` would build (and nothing else)."""
    return load_settings(environ=service_env)


# ---- end of server fixtures -------------------------------------------------------------------


# ---- worker fixtures (owner: Celery service) --------------------------------------------------
# Real `celery -A stylequeue.tasks.app worker` subprocesses, one GPU-queue and one light-queue
# worker per test MODULE (starting them costs seconds of torch import; jobs are independent by id).
# A module needs its own bucket and data folder for that, because service_env is per test; it
# uses Redis databases 2 and 3 (flushed at start) so it never shares a queue with a per-test
# service_env (databases 0 and 1). On a failing test the workers' logs are printed.
# The GPU worker uses the prefork pool with one child, as `stylequeue worker` does: prefork
# enforces time limits and re-queues a job whose process dies; CUDA (absent here) would first be
# touched in the child.

from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402
from typing import Any as _Any  # noqa: E402

from testbed.workers import CeleryWorker, start_all, stop_all  # noqa: E402


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item, so fixtures can tell a failed test."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def module_service_env(redis_server: RedisServer, s3_server: S3Server, bucket: str,
                       data: Path, **extra: str) -> dict[str, str]:
    """service_env's variables for a module-wide bucket, on Redis databases 2 and 3 (``extra``
    adds or overrides variables)."""
    return service_env_for(
        redis_server, s3_server, bucket, data, broker_db=2, backend_db=3,
        # Small cadences so tests see progress, previews and checkpoints within a few iterations.
        STYLEQUEUE_PROGRESS_EVERY="1", STYLEQUEUE_PREVIEW_EVERY="2", STYLEQUEUE_CHECKPOINT_EVERY="2", **extra,
    )


@_dataclass
class ServiceWorkers:
    """What a service test needs: the env and Settings, an app, the bucket and the workers."""

    env: dict[str, str]
    settings: Settings
    app: _Any
    bucket: str
    s3: _Any
    gpu: CeleryWorker
    light: CeleryWorker

    def put_png(self, key: str, size: tuple[int, int], seed: int) -> str:
        """Upload a generated test image under ``key`` in this module's bucket; return its URI."""
        import io

        from tests.conftest import make_image

        buffer = io.BytesIO()
        make_image(*size, seed=seed).save(buffer, "PNG")
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=buffer.getvalue())
        return f"s3://{self.bucket}/{key}"

    def get(self, uri: str) -> bytes:
        """The bytes of an ``s3://`` object, read with boto3 directly (not through stylequeue)."""
        bucket, key = uri[len("s3://"):].split("/", 1)
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def logs(self) -> str:
        return (f"--- gpu worker log ---\n{self.gpu.log_text()[-6000:]}\n"
                f"--- light worker log ---\n{self.light.log_text()[-6000:]}")


@contextmanager
def module_workers(redis_server: RedisServer, s3_server: S3Server, data: Path,
                   **extra_env: str) -> Iterator[ServiceWorkers]:
    """A GPU-queue and a light-queue worker on ``redis_server`` with ``module_service_env``'s
    variables (plus ``extra_env``) and a bucket of their own; stopped (warm) on exit."""
    from stylequeue.tasks.app import make_app

    if not redis_server.running:
        redis_server.start()
    for db in (2, 3):
        redis_server.client(db).flushdb()
    bucket = s3_server.make_bucket()
    env = module_service_env(redis_server, s3_server, bucket, data, **extra_env)
    settings = load_settings(environ=env)
    gpu = CeleryWorker(env, settings.gpu_queue, name="gpu0")
    light = CeleryWorker(env, settings.light_queue, name="light", concurrency=2)
    start_all([gpu, light])
    try:
        yield ServiceWorkers(env, settings, make_app(settings), bucket, s3_server.client(), gpu, light)
    finally:
        stop_all([gpu, light])
        s3_server.remove_bucket(bucket)


@pytest.fixture(scope="module")
def service_workers(
    redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceWorkers]:
    """A GPU-queue worker and a light-queue worker for this module, stopped (warm) at its end."""
    with module_workers(redis_server, s3_server, tmp_path_factory.mktemp("service")) as workers:
        yield workers


@pytest.fixture
def service(service_workers: ServiceWorkers, request: pytest.FixtureRequest) -> Iterator[ServiceWorkers]:
    """``service_workers`` for one test; prints the workers' logs when the test failed."""
    assert service_workers.gpu.running and service_workers.light.running, service_workers.logs()
    yield service_workers
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(service_workers.logs())


# ---- end of worker fixtures -------------------------------------------------------------------
