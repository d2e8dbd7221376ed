"""Flower for real: `stylequeue flower` and `stylequeue worker` processes on the test servers.

One stack for the module (a `stylequeue worker` launcher and a `stylequeue flower` process on the
session's Redis and S3), queues named for the module so no other test's worker takes its jobs, and
HTTP over loopback as a browser or Prometheus would use it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from celery import Celery
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stylequeue.settings import load_settings
from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_VALIDATE, make_app
from testbed.net import free_port, wait_until
from testbed.redis import RedisServer
from testbed.s3 import S3Server
from testbed.workers import start_stylequeue, stop_process
from tests.service.conftest import module_service_env

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "ops", "flower-" + uuid.uuid4().hex[:12]
HOST = socket.gethostname()


@dataclass
class Stack:
    env: dict[str, str]
    app: Celery
    port: int
    bucket: str
    tmp: Path
    last_error: str = ""

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:  # kept for the "not ready" message
            self.last_error = repr(exc)
            raise

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics", auth=None)
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker launcher and one Flower for the module: each takes ~20 s to start here.

    The environment is ``module_service_env``'s plus queues named for this module, progress on
    every iteration and Flower's credentials.
    """
    for server in (redis_server, s3_server):  # a fault test may have left one stopped
        if not server.running:
            server.start()
    tmp = tmp_path_factory.mktemp("flower")
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    bucket = s3_server.make_bucket()
    env = {
        **os.environ,
        **module_service_env(redis_server, s3_server, bucket, tmp),
        # Databases of its own: other modules' fixtures flush theirs.
        "STYLEQUEUE_BROKER_URL": redis_server.url_for(4),
        "STYLEQUEUE_RESULT_BACKEND": redis_server.url_for(5),
        "STYLEQUEUE_GPU_QUEUE": f"gpu-{tag}",
        "STYLEQUEUE_LIGHT_QUEUE": f"light-{tag}",
        "STYLEQUEUE_PROGRESS_EVERY": "1",
        "STYLEQUEUE_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    s3 = s3_server.client()
    for key, seed in (("in/content.png", 1), ("in/style.png", 2)):
        s3.put_object(Bucket=bucket, Key=key, Body=png(seed))
    app = make_app(load_settings(environ=env))
    worker = start_stylequeue(["worker", "--gpus", "0", "--concurrency-light", "1"], env, tmp / "worker.log")
    flower = start_stylequeue(["flower", "--port", str(port), "--address", "127.0.0.1"], env, tmp / "flower.log")
    stack = Stack(env, app, port, bucket, tmp)
    try:
        wait_until(lambda: stack.get("/healthcheck", auth=None)[0] == 200, 120, "flower",
                   lambda: f"last error: {stack.last_error}\n" + (tmp / "flower.log").read_text(errors="replace"))
        yield stack
    finally:
        stop_process(flower, 20)
        stop_process(worker)
        app.close()
        s3_server.remove_bucket(bucket)


@pytest.fixture
def logs_on_failure(stack: Stack) -> Iterator[None]:
    """Print the worker's and Flower's logs, which pytest shows when the test fails."""
    yield
    for name in ("flower.log", "worker.log"):
        print(f"--- {name} ---\n{(stack.tmp / name).read_text(errors='replace')[-3000:]}")


def submit(stack: Stack, job_id: str, iterations: int) -> Any:
    from stylequeue.scheduler import submit as submit_job

    return submit_job({
        "job_id": job_id,
        "content": f"s3://{stack.bucket}/in/content.png",
        "styles": [f"s3://{stack.bucket}/in/style.png"],
        "params": {"size": 32, "iterations": iterations},
    }, app=stack.app)


def test_flower_requires_basic_auth_but_serves_metrics_without_it(stack: Stack, logs_on_failure: None) -> None:
    for path in ("/", "/tasks", "/api/workers", "/api/tasks"):
        assert stack.get(path, auth=None)[0] == 401, path
        assert stack.get(path, auth=(USER, "wrong"))[0] == 401, path
    status, page = stack.get("/tasks")
    assert status == 200
    # The columns run_flower asks for (TASKS_COLUMNS), by their Flower labels.
    for label in (b"Name", b"State", b"Received", b"Started", b"Runtime", b"Worker", b"args", b"Result"):
        assert label in page, label
    # The documented truth (docs/monitoring.md): Flower 2.x checks no auth on these two.
    assert stack.get("/metrics", auth=None)[0] == 200
    assert stack.get("/healthcheck", auth=None)[0] == 200


def test_flower_shows_workers_tasks_progress_and_metrics(stack: Stack, logs_on_failure: None) -> None:
    gpu_node, light_node = f"cpu0@{HOST}", f"light@{HOST}"
    wait_until(lambda: {gpu_node, light_node} <= set(stack.json("/api/workers?refresh=1")), 60,
               "workers in Flower")

    job_id = f"flower-{uuid.uuid4().hex[:8]}"
    result = submit(stack, job_id, iterations=4).wait(timeout=180)
    assert result["status"] == "succeeded", result

    expected = {
        f"{job_id}.validate": (TASK_VALIDATE, light_node),
        f"{job_id}.stylize.0": (TASK_STYLIZE, gpu_node),
        f"{job_id}.publish": (TASK_PUBLISH, light_node),
    }

    def tasks_done() -> bool:
        tasks = stack.json("/api/tasks")
        return all(tasks.get(tid, {}).get("state") == "SUCCESS" for tid in expected)

    wait_until(tasks_done, 30, "task-succeeded events in Flower")
    tasks = stack.json("/api/tasks")
    for task_id, (name, node) in expected.items():
        assert (tasks[task_id]["name"], tasks[task_id]["worker"]) == (name, node)

    samples = stack.metrics()
    progress = samples.get(("flower_events_total", (("task", TASK_STYLIZE), ("type", "task-progress"),
                                                    ("worker", gpu_node))), 0)
    assert progress >= 1, "no task-progress events counted for stylequeue.stylize"
    for name, node in set(expected.values()):
        key = ("flower_events_total", (("task", name), ("type", "task-succeeded"), ("worker", node)))
        assert samples.get(key, 0) >= 1, key
    assert samples[("flower_worker_online", (("worker", gpu_node),))] == 1
    assert samples[("flower_task_runtime_seconds_count", (("task", TASK_STYLIZE), ("worker", gpu_node)))] >= 1


def test_flower_shows_a_running_job_as_progress(stack: Stack, logs_on_failure: None) -> None:
    """A long job: Flower's state for its stylize task becomes PROGRESS (from task-progress events)."""
    job = submit(stack, f"flower-long-{uuid.uuid4().hex[:8]}", iterations=5000)
    task_id = f"{job.job_id}.stylize.0"
    try:
        def in_progress() -> bool:
            status, body = stack.get(f"/api/task/info/{task_id}")
            return status == 200 and json.loads(body)["state"] == "PROGRESS"

        wait_until(in_progress, 120, "PROGRESS state in Flower")
        info = stack.json(f"/api/task/info/{task_id}")
        assert info["name"] == TASK_STYLIZE
    finally:
        job.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.status().value not in ("cancelled", "failed"):
        time.sleep(0.25)
    assert job.status().value == "cancelled"


def test_healthcheck_script_pings_the_workers_of_this_host(stack: Stack, logs_on_failure: None) -> None:
    wait_until(lambda: {f"cpu0@{HOST}", f"light@{HOST}"} <= set(stack.json("/api/workers?refresh=1")),
               60, "workers")
    env = {**stack.env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    script = str(ROOT / "deploy" / "healthcheck.sh")
    ok = subprocess.run(["sh", script], env={**env, "HEALTHCHECK_NODES": "cpu0 light"},
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = subprocess.run(["sh", script],
                             env={**env, "HEALTHCHECK_NODES": "cpu0 gpu7", "HEALTHCHECK_TIMEOUT": "2"},
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and f"gpu7@{HOST}" in missing.stderr


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("", ("STYLEQUEUE_FLOWER_BASIC_AUTH=user:password", "STYLEQUEUE_FLOWER_INSECURE_NO_AUTH=1")),
        ("admin", ("'user:password' pairs",)),
    ],
)
def test_flower_refuses_to_start_without_valid_auth(
    tmp_path: Path, auth: str, expected: tuple[str, ...]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STYLEQUEUE_", "FLOWER_"))}
    env.update(STYLEQUEUE_DATA_DIR=str(tmp_path), STYLEQUEUE_FLOWER_BASIC_AUTH=auth)
    result = subprocess.run([sys.executable, "-m", "stylequeue", "flower", "--port", str(free_port())],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for text in expected:
        assert text in result.stderr


def test_format_task_truncates_long_fields_for_the_tasks_page() -> None:
    from types import SimpleNamespace

    from stylequeue.monitoring.flower import MAX_FIELD_CHARS, format_task

    task = SimpleNamespace(args="x" * 5000, kwargs="{'step': 0}", result=None)
    shown = format_task(task)
    assert len(shown.args) == MAX_FIELD_CHARS and shown.args.endswith("...")
    assert (shown.kwargs, shown.result) == ("{'step': 0}", None)
