"""The job history: 200 jobs of mixed outcomes through real workers, listed and filtered; the
history intact after Flower, a worker and Redis (append-only, as deployed) restart; and
``stylequeue jobs`` as a user runs it.

Most of the 200 jobs end at once, as real jobs do: a missing input or one past the pixel limit
fails at validate, and a job cancelled as soon as it is submitted is dropped when a worker takes
it. Six really run (32 px, 4 iterations).
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from stylequeue.scheduler import get_job, list_jobs, submit
from stylequeue.tasks.control import KeyValue, key_value
from stylequeue.tasks.history import JobHistory
from testbed.net import free_port, wait_until
from testbed.redis import RedisServer
from testbed.workers import start_stylequeue, stop_process
from tests.service.conftest import ServiceWorkers, module_service_env, module_workers
from tests.service.fault_stack import wait_for
from tests.service.test_control import store  # noqa: F401 - the Redis and file stores, as a fixture

pytestmark = pytest.mark.timeout(300)

FLOWER_AUTH = ("admin", "history-test")
ENDED = ("succeeded", "failed", "cancelled", "timed_out")
# Per wave of 100: (outcome, how many); the second wave is submitted after a mark in time.
WAVE = (("succeeded", 3), ("missing", 40), ("too_large", 20), ("cancelled", 37))


@pytest.fixture(scope="module")
def durable_redis() -> Iterator[RedisServer]:
    """This module's own Redis, with appendonly (fsync always) as a deployment runs it."""
    with RedisServer(appendonly=True) as server:
        yield server


class Flower:
    """``stylequeue flower`` on this module's Redis, with basic auth; ``tasks()`` is its /api/tasks."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port, self.log, self.proc = free_port(), log, None
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "STYLEQUEUE_FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}

    def launch(self) -> None:
        self.proc = start_stylequeue(["flower", "--port", str(self.port), "--address", "127.0.0.1"], self.env,
                                     self.log)

    def wait_ready(self) -> None:
        wait_until(lambda: self.tasks() is not None, 120, "flower", lambda: self.log.read_text(errors="replace"))

    def tasks(self) -> dict[str, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/tasks")
        token = base64.b64encode(":".join(FLOWER_AUTH).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def flower(durable_redis: RedisServer, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """Flower, launched before the workers so that its start (seconds) overlaps theirs; it reads
    only Redis (the workers' databases: module_service_env's), so it needs no bucket of theirs."""
    tmp = Path(tmp_path_factory.mktemp("flower"))
    server = Flower(module_service_env(durable_redis, s3_server, "flower-reads-no-bucket", tmp), tmp / "flower.log")
    server.launch()
    try:
        yield server
    finally:
        stop_process(server.proc, 20)


@pytest.fixture(scope="module")
def service_workers(durable_redis: RedisServer, s3_server, flower: Flower,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceWorkers]:
    """Workers on the durable Redis (a 4096-pixel limit makes an 80x80 input too large), and
    Flower ready to watch them."""
    with module_workers(durable_redis, s3_server, Path(tmp_path_factory.mktemp("history")),
                        STYLEQUEUE_MAX_PIXELS="4096") as workers:
        workers.put_png("in/content.png", (48, 32), 1)
        workers.put_png("in/style.png", (40, 40), 2)
        workers.put_png("in/large.png", (80, 80), 3)
        flower.wait_ready()
        yield workers


def _spec(service: ServiceWorkers, outcome: str) -> dict[str, Any]:
    content = {"missing": "in/absent.png", "too_large": "in/large.png"}.get(outcome, "in/content.png")
    iterations = 100_000 if outcome == "cancelled" else 4
    return {"job_id": f"h-{outcome[:4]}-{uuid.uuid4().hex[:8]}", "content": f"s3://{service.bucket}/{content}",
            "styles": [f"s3://{service.bucket}/in/style.png"], "params": {"size": 32, "iterations": iterations}}


def _submit_wave(service: ServiceWorkers, rng: random.Random) -> dict[str, str]:
    """100 jobs in a shuffled order: {job_id: the status it must end in}."""
    outcomes = [outcome for outcome, n in WAVE for _ in range(n)]
    rng.shuffle(outcomes)
    expected = {}
    for outcome in outcomes:
        job = submit(_spec(service, outcome), app=service.app)
        if outcome == "cancelled":
            job.cancel()
        expected[job.job_id] = outcome if outcome in ENDED else "failed"
    return expected


def _all(**filters: Any) -> list[dict[str, Any]]:
    return list_jobs(limit=1000, **filters)[0]


def _pages(limit: int, **filters: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        records, cursor = list_jobs(limit=limit, cursor=cursor, **filters)
        pages.append(records)
        if cursor is None:
            return pages


@pytest.fixture(scope="module")
def jobs(service_workers: ServiceWorkers) -> dict[str, Any]:
    """The 200 jobs, ended: expected statuses by wave, and the time between the waves."""
    rng = random.Random(14)
    first = _submit_wave(service_workers, rng)
    time.sleep(0.05)
    mark = time.time()
    second = _submit_wave(service_workers, rng)
    expected = {**first, **second}
    wait_for(lambda: sum(r["status"] in ENDED for r in _all(app=service_workers.app)) == 200, 180,
             "200 jobs ended", interval=0.5, logs=service_workers.logs)
    return {"first": first, "second": second, "expected": expected, "mark": mark}


def test_200_jobs_of_mixed_outcomes_are_listed_and_filtered(service: ServiceWorkers, jobs: dict[str, Any]) -> None:
    app, expected = service.app, jobs["expected"]
    records = _all(app=app)
    assert {r["job_id"]: r["status"] for r in records} == expected
    assert [r["submitted_at"] for r in records] == sorted((r["submitted_at"] for r in records), reverse=True)
    for record in records:  # the history agrees with what Celery's states say
        assert get_job(record["job_id"], app=app).status().value == record["status"], record
        assert record["ended_at"] >= record["submitted_at"] and record["spec"]["size"] == 32
    succeeded = [r for r in records if r["status"] == "succeeded"]
    assert all(r["worker"] == service.gpu.hostname and r["started_at"] and r["result_uri"] for r in succeeded)
    assert all("ImageTooLargeError" in r["error"] or "ObjectNotFoundError" in r["error"]
               for r in records if r["status"] == "failed")
    for status in ("succeeded", "failed", "cancelled"):
        assert {r["job_id"] for r in _all(status=status, app=app)} == {j for j, s in expected.items() if s == status}
    assert not _all(status="running", app=app) and not _all(status="queued", app=app)
    assert {r["job_id"] for r in _all(since=jobs["mark"], app=app)} == set(jobs["second"])
    assert {r["job_id"] for r in _all(since=jobs["mark"], status="cancelled", app=app)} == {
        j for j, s in jobs["second"].items() if s == "cancelled"}
    # Pages: every job once, in the order of the whole list, whatever the page size.
    pages = _pages(37, app=app)
    assert [len(p) for p in pages] == [37] * 5 + [15]
    assert [r["job_id"] for p in pages for r in p] == [r["job_id"] for r in records]
    failed_pages = _pages(7, status="failed", since=jobs["mark"], app=app)
    failed = _all(status="failed", since=jobs["mark"], app=app)
    assert [r["job_id"] for p in failed_pages for r in p] == [r["job_id"] for r in failed]


class _CountingStore:
    """A real store that counts the records read (a spy: every call goes to Redis)."""

    def __init__(self, inner: KeyValue) -> None:
        self.inner, self.gets = inner, 0

    def get(self, key: str) -> str | None:
        self.gets += 1
        return self.inner.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_status_page_reads_only_its_records(service: ServiceWorkers, jobs: dict[str, Any]) -> None:
    counting = _CountingStore(key_value(service.app))
    records, cursor = JobHistory(None, counting).page("succeeded", limit=2)  # type: ignore[arg-type]
    assert len(records) == 2 and cursor is not None and counting.gets == 3  # the page and one to see more


def test_stylequeue_jobs_prints_the_history(service: ServiceWorkers, jobs: dict[str, Any]) -> None:
    env = {**os.environ, **service.env}
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(jobs["mark"] - 1)) + "Z"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, "-m", "stylequeue", "jobs", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out

    listed = json.loads(run("--status", "failed", "--since", since, "--limit", "5", "--json").stdout)
    api, cursor = list_jobs(status="failed", since=jobs["mark"] - 1, limit=5, app=service.app)
    assert listed == {"jobs": api, "next_cursor": cursor} and len(api) == 5
    table = run("--status", "succeeded", "--since", "1h")
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["JOB", "ID", "STATUS"] and len(lines) == 1 + 6
    assert all(" succeeded " in line and "result.png" in line for line in lines[1:])
    assert "more:" not in table.stderr
    bad = subprocess.run([sys.executable, "-m", "stylequeue", "jobs", "--since", "yesterday"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "90s, 15m, 1h, 2d" in bad.stderr


def test_history_survives_flower_worker_and_redis_restarts(service: ServiceWorkers, jobs: dict[str, Any],
                                                           flower: Flower, durable_redis: RedisServer) -> None:
    before = _all(app=service.app)
    some = next(r["job_id"] for r in before if r["status"] == "succeeded")
    assert f"{some}.publish" in flower.tasks()  # Flower saw the jobs run...
    service.gpu.terminate()  # Flower and a worker restart at once (each takes seconds to start)
    stop_process(flower.proc, 20)
    service.gpu.stop()
    flower.launch()
    service.gpu.launch()
    flower.wait_ready()
    service.gpu.wait_ready()
    assert f"{some}.publish" not in flower.tasks()  # ...and forgot them when it restarted
    assert _all(app=service.app) == before
    durable_redis.restart()
    assert _all(app=service.app) == before
    # The service goes on after the restart, and the history with it.
    job = submit(_spec(service, "succeeded"), app=service.app)
    job.wait(timeout=120)
    after = _all(app=service.app)
    assert after[0]["job_id"] == job.job_id and after[0]["status"] == "succeeded" and after[1:] == before


def test_paging_is_exact_when_jobs_share_a_submit_time(store: KeyValue) -> None:  # noqa: F811
    """Equal times (a burst within one clock tick) page without gaps or repeats, in Redis and files."""
    history, now = JobHistory(None, store), float(int(time.time()))
    for i in range(23):
        record = {"job_id": f"tie-{i:02d}", "status": "failed" if i % 3 else "queued", "submitted_at": now + (i >= 20)}
        history.change(record["job_id"], lambda _, record=record: record)
    pages, cursor = [], None
    while True:
        records, cursor = history.page(limit=4, cursor=cursor)
        pages.append([r["job_id"] for r in records])
        if cursor is None:
            break
    assert [len(p) for p in pages] == [4] * 5 + [3]
    # Newest first; within one time, as the index orders equal scores (ids descending).
    assert [job_id for p in pages for job_id in p] == [f"tie-{i:02d}" for i in (22, 21, 20, *range(19, -1, -1))]
    failed, cursor = history.page(status="failed", limit=100)
    assert len(failed) == 15 and cursor is None
    assert history.page(status="failed", since=now + 1)[0] == [r for r in failed if r["submitted_at"] >= now + 1]
