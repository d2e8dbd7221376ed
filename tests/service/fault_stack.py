"""A private service stack for the fault, bad-input and security tests (issue 4).

The shared ``service_workers`` fixture runs one GPU and one light worker on the session's Redis;
fault tests need more: two GPU workers (one to kill, one to take over), a durable Redis
(``appendonly``) that can be restarted under them, and settings tuned so a fault shows within
seconds (short visibility timeout, small retry budgets). :func:`start_stack` builds that from real
processes and tears it down; the helpers below are what every such test does with a job.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from stylequeue.settings import Settings, load_settings
from stylequeue.tasks.broker import queue_keys, task_ids_on_broker
from testbed.env import service_env_for
from testbed.redis import RedisServer
from testbed.s3 import S3Server
from testbed.workers import Beat, CeleryWorker, start_all, stop_all
from tests.conftest import make_image


@dataclass
class Stack:
    """Servers, settings, app and workers of one test module."""

    env: dict[str, str]
    settings: Settings
    app: Any
    bucket: str
    s3: Any  # boto3 client
    s3_server: S3Server
    redis: RedisServer
    gpu: list[CeleryWorker]
    light: CeleryWorker
    extra_workers: list[CeleryWorker] = field(default_factory=list)
    beat: Beat | None = None

    @property
    def workers(self) -> list[CeleryWorker]:
        return [*self.gpu, self.light, *self.extra_workers]

    def logs(self, tail: int = 5000) -> str:
        beat = f"\n--- beat ---\n{self.beat.log_text()[-tail:]}" if self.beat else ""
        return "\n".join(f"--- {w.hostname} ---\n{w.log_text()[-tail:]}" for w in self.workers) + beat

    def all_logs(self) -> str:
        return "\n".join(w.log_text() for w in self.workers)

    # --- objects ---------------------------------------------------------------------------------
    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"

    def put_png(self, key: str, size: tuple[int, int], seed: int) -> str:
        buffer = io.BytesIO()
        make_image(*size, seed=seed).save(buffer, "PNG")
        return self.put(key, buffer.getvalue())

    def put_samples(self) -> "Stack":
        """The content (48x32) and style (40x40) images most tests use, as ``content``/``style``."""
        self.content = self.put_png("in/content.png", (48, 32), 1)
        self.style = self.put_png("in/style.png", (40, 40), 2)
        return self

    def get(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def get_json(self, uri: str) -> dict[str, Any]:
        return json.loads(self.get(uri))

    def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out

    def all_versions(self, prefix: str) -> list[str]:
        """The key of every version written under ``prefix`` (the bucket is versioned), deleted ones too."""
        pages = self.s3.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix)
        return [v["Key"] for page in pages for v in page.get("Versions", [])]

    def versions(self, uri: str) -> int:
        """How many times ``uri`` was written (the bucket is versioned)."""
        bucket, key = split_s3(uri)
        listing = self.s3.list_object_versions(Bucket=bucket, Prefix=key)
        return sum(1 for v in listing.get("Versions", []) if v["Key"] == key)

    # --- broker ----------------------------------------------------------------------------------
    def on_broker(self) -> set[str]:
        """Task ids queued (any priority list) or taken and unacknowledged: recovery's view."""
        keys = queue_keys(self.app.conf.broker_transport_options)
        queues = [self.settings.gpu_queue, self.settings.light_queue]
        return task_ids_on_broker(self.redis.client(0), queues, keys)

    def queued(self) -> int:
        """Messages waiting in the GPU and light queues (every priority list) on the broker."""
        client = self.redis.client(0)
        total = 0
        for name in (self.settings.gpu_queue, self.settings.light_queue):
            for key in client.keys(f"{name}*"):
                if client.type(key) == b"list":
                    total += int(client.llen(key))
        return total


def workers_up(stack: Stack, request: Any) -> Iterator[Stack]:
    """A test's view of a module stack: every worker up (restarting any an earlier test killed),
    and the workers' logs printed when the test fails. ``yield from`` it in a fixture."""
    down = [w for w in stack.workers if not w.running]
    for worker in down:
        worker.launch()
    for worker in down:
        worker.wait_ready()
    yield stack
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stack.logs())


def split_s3(uri: str) -> tuple[str, str]:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return bucket, key


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1,
             logs: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` (with logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout} s\n{logs()[-8000:]}")


def job_spec(content: str, style: str, job_id: str | None = None, **params: Any) -> dict[str, Any]:
    return {
        "job_id": job_id or f"j-{uuid.uuid4().hex[:12]}",
        "content": content,
        "styles": [style],
        "params": {"size": 32, "iterations": 2, **params},
    }


def pids_of_children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the prefork pool's processes), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in children.read_text().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def start_stack(
    s3_server: S3Server,
    tmp: Path,
    *,
    gpu_workers: int = 1,
    light_concurrency: int = 2,
    redis: RedisServer | None = None,
    appendonly: bool = False,
    redis_password: str | None = None,
    gpu_args: list[str] | None = None,
    versioned: bool = False,
    extra_env: dict[str, str] | None = None,
    beat: bool = False,
) -> Iterator[Stack]:
    """Start Redis (unless given), a bucket, ``gpu_workers`` GPU workers and a light worker
    (and ``stylequeue beat``, which sends the lost-message recovery sweep, when ``beat``).

    ``extra_env`` values may name the module's bucket as ``{bucket}``.
    """
    from stylequeue.tasks.app import make_app

    own_redis = redis is None
    server = redis or RedisServer(appendonly=appendonly, password=redis_password)
    if own_redis:
        server.__enter__()
    if not s3_server.running:
        s3_server.start()
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    env = service_env_for(server, s3_server, bucket, tmp, **{
        "STYLEQUEUE_PROGRESS_EVERY": "1",
        "STYLEQUEUE_PREVIEW_EVERY": "0",
        "STYLEQUEUE_CHECKPOINT_EVERY": "2",
        **{k: v.format(bucket=bucket) for k, v in (extra_env or {}).items()},
    })
    settings = load_settings(environ=env)
    gpu = [CeleryWorker(env, settings.gpu_queue, name=f"gpu{i}", extra_args=gpu_args)
           for i in range(gpu_workers)]
    light = CeleryWorker(env, settings.light_queue, name="light", concurrency=light_concurrency)
    stack = Stack(env, settings, make_app(settings), bucket, client, s3_server, server, gpu, light)
    try:
        start_all([*gpu, light])
        if beat:
            stack.beat = Beat(env, tmp / "beat").start()
        yield stack
    finally:
        if stack.beat is not None:
            stack.beat.stop()
        stop_all(stack.workers, timeout=20)
        if not s3_server.running:
            s3_server.start()
        s3_server.faults.fail_next(0)
        _remove_versioned_bucket(client, bucket) if versioned else s3_server.remove_bucket(bucket)
        if own_redis:
            server.__exit__(None, None, None)
        for worker in stack.workers:
            if os.environ.get("STYLEQUEUE_KEEP_WORKER_LOGS") is None:
                worker.log_path.unlink(missing_ok=True)


def _remove_versioned_bucket(client: Any, bucket: str) -> None:
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                      for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]]
            if doomed:
                client.delete_objects(Bucket=bucket, Delete={"Objects": doomed})
        client.delete_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - cleanup must not mask the test's own failure
        pass
