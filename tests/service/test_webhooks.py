"""Webhooks end to end: real workers, Redis and S3, and a real HTTP receiver on loopback
(testbed/receiver.py) listed in the deployment's allow-list.

Every delivery the receiver gets is checked against the computation of tests/test_webhooks.py,
written from the scheme, and with :func:`stylequeue.webhooks.verify`, as a receiver would.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from stylequeue.cli.jobs import history_line
from stylequeue.exceptions import JobSpecError
from stylequeue.job import JobStatus
from stylequeue.scheduler import submit
from stylequeue.scheduler.jobs import JobHandle, parse_spec
from stylequeue.tasks.control import JobControl
from stylequeue.webhooks import new_secret, verify
from testbed.receiver import Received, WebhookReceiver
from tests.service.conftest import ServiceWorkers, module_workers
from tests.service.fault_stack import wait_for
from tests.test_webhooks import _reference

pytestmark = pytest.mark.timeout(240)

SECRET = new_secret()
TIMEOUT_S = 5  # per attempt: longer than a small job takes end to end here
RETRY_FOR_S = 8


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def service_workers(redis_server, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceWorkers]:
    """This module's workers (``service`` wraps them), allowed to deliver to 127.0.0.1: listed by
    name, so a loopback address passes."""
    with module_workers(redis_server, s3_server, Path(tmp_path_factory.mktemp("hooks")),
                        STYLEQUEUE_WEBHOOK_SECRET=SECRET, STYLEQUEUE_WEBHOOK_ALLOWED="127.0.0.1",
                        STYLEQUEUE_WEBHOOK_TIMEOUT_S=str(TIMEOUT_S), STYLEQUEUE_WEBHOOK_RETRY_FOR_S=str(RETRY_FOR_S),
                        STYLEQUEUE_WEBHOOK_PRESIGN_S="600", STYLEQUEUE_WEBHOOK_PROGRESS_EVERY_S="0") as workers:
        workers.put_png("in/content.png", (48, 32), 1)
        workers.put_png("in/style.png", (40, 40), 2)
        yield workers


def _spec(service: ServiceWorkers, url: str | None, events: list[str] | None = None, **params: Any) -> dict:
    spec: dict[str, Any] = {"job_id": f"wh-{uuid.uuid4().hex[:10]}",
                            "content": f"s3://{service.bucket}/in/content.png",
                            "styles": [f"s3://{service.bucket}/in/style.png"],
                            "params": {"size": 32, "iterations": 4, **params}}
    if url is not None:
        spec["webhook"] = {"url": url, **({"events": events} if events else {})}
    return spec


def _verified(request: Received) -> dict[str, Any]:
    """The delivery's payload, once its signature checks out both ways."""
    headers = request.headers
    expected = _reference(SECRET, headers["webhook-id"], int(headers["webhook-timestamp"]), request.body)
    assert headers["webhook-signature"] == expected
    verify(SECRET, headers, request.body)
    assert headers["content-type"] == "application/json"
    return request.json()


def _ended(job: JobHandle, timeout: float = 60) -> dict[str, Any]:
    """The job's history once it ended, checked against the status Celery's states give."""
    record = wait_for(lambda: (r := job.history()) and r["status"] in ("succeeded", "failed", "cancelled",
                                                                    "timed_out") and r, timeout, "history end")
    assert record["status"] == job.status().value
    return record


def test_a_job_gets_signed_events_that_verify(service: ServiceWorkers, receiver: WebhookReceiver) -> None:
    path = f"/all/{uuid.uuid4().hex[:6]}"
    job = submit(_spec(service, receiver.url(path), ["started", "progress", "succeeded"]), app=service.app)
    summary = job.wait(timeout=120)
    got = wait_for(lambda: [r for r in receiver.received(path) if r.json()["type"] == "job.succeeded"] and
                   receiver.received(path), 30, "the succeeded delivery")
    payloads = [_verified(r) for r in got]
    types = [p["type"] for p in payloads]
    assert types[0] == "job.started" and types.count("job.started") == 1 and "job.progress" in types, types
    assert len({r.headers["webhook-id"] for r in got}) == len(got)  # one id per delivery
    (done,) = [p["data"] for p in payloads if p["type"] == "job.succeeded"]
    assert done["job_id"] == job.job_id and done["status"] == "succeeded"
    assert done["result_uri"] == summary["result_uri"] and done["metadata_uri"] == summary["metadata_uri"]
    with urllib.request.urlopen(done["presigned_url"], timeout=10) as response:  # a link that works
        assert response.read() == service.get(summary["result_uri"])
    progress = [p["data"]["progress"] for p in payloads if p["type"] == "job.progress"]
    assert all(0 < p["iteration"] <= p["total"] == 4 for p in progress), progress
    bodies = b"".join(r.body for r in got).decode()
    assert service.settings.s3_secret_access_key not in bodies and SECRET not in bodies
    record = _ended(job)
    assert record["started_at"] <= record["ended_at"] and record["worker"] == service.gpu.hostname


def test_a_receiver_answering_500_twice_then_200_gets_the_event_once(service: ServiceWorkers,
                                                                     receiver: WebhookReceiver) -> None:
    path = f"/flaky/{uuid.uuid4().hex[:6]}"
    receiver.answer(path, [500, 500])
    job = submit(_spec(service, receiver.url(path)), app=service.app)  # the terminal events
    job.wait(timeout=120)
    got = wait_for(lambda: len(receiver.received(path)) >= 3 and receiver.received(path), 30, "three attempts")
    assert [r.status for r in got] == [500, 500, 200]
    assert len({r.headers["webhook-id"] for r in got}) == 1  # one delivery, retried
    assert len({r.body for r in got}) == 1 and [_verified(r)["type"] for r in got] == ["job.succeeded"] * 3
    assert got[1].at - got[0].at >= 0.45 and got[2].at - got[1].at >= 0.95  # backoff, not a tight loop
    delivery = wait_for(lambda: (d := (job.history() or {}).get("delivery")) and d["delivered"] and d, 10,
                        "the outcome in the history")
    assert delivery["attempts"] == 3 and delivery["http_status"] == 200 and delivery["final"]
    assert delivery["id"] == got[0].headers["webhook-id"]
    assert "webhook succeeded delivered (HTTP 200, 3 attempts" in history_line(job.history())
    time.sleep(1.5)
    assert len(receiver.received(path)) == 3  # accepted: never sent again


def test_a_receiver_that_never_answers_holds_up_neither_the_job_nor_the_light_worker(
        service: ServiceWorkers, receiver: WebhookReceiver) -> None:
    path = f"/hang/{uuid.uuid4().hex[:6]}"
    receiver.hang(path)
    stuck = submit(_spec(service, receiver.url(path)), app=service.app)
    stuck.wait(timeout=120)
    (first,) = wait_for(lambda: receiver.received(path), 30, "the hung delivery")
    assert stuck.history()["ended_at"] <= first.at  # the job had ended before its delivery began
    # While a light worker process waits on the receiver, another job goes through the light queue.
    other = submit(_spec(service, None), app=service.app)
    other.wait(timeout=60)
    other_done = other.history()["ended_at"]
    assert first.closed_at is None or first.closed_at > other_done, (first.at, first.closed_at, other_done)
    # Each attempt gives up after TIMEOUT_S; retrying stops RETRY_FOR_S after the first.
    delivery = wait_for(lambda: (d := (stuck.history() or {}).get("delivery")) and d["final"] and d,
                        RETRY_FOR_S + 3 * TIMEOUT_S, "the delivery given up")
    assert not delivery["delivered"] and delivery["http_status"] is None and "timed out" in delivery["error"]
    attempts = receiver.received(path)
    assert delivery["attempts"] == len(attempts) >= 2 and len({r.headers["webhook-id"] for r in attempts}) == 1
    assert all(4.5 <= r.closed_at - r.at <= TIMEOUT_S + 2 for r in attempts if r.closed_at)
    assert attempts[-1].at - attempts[0].at <= RETRY_FOR_S


def test_a_url_outside_the_allow_list_is_refused_at_submit(service: ServiceWorkers, receiver: WebhookReceiver) -> None:
    for url, why in ((f"http://localhost:{receiver.port}/x", "allow-list"), ("http://10.0.0.7/x", "allow-list"),
                     (f"http://user:pw@127.0.0.1:{receiver.port}/x", "credentials")):
        spec = _spec(service, url)
        with pytest.raises(JobSpecError, match=why) as info:
            submit(spec, app=service.app)
        assert "webhook" in str(info.value)
        assert JobControl(service.app).record(spec["job_id"]) is None  # nothing claimed or queued
    unsigned = service.settings.replace(webhook_secret="")
    with pytest.raises(JobSpecError, match="STYLEQUEUE_WEBHOOK_SECRET"):
        parse_spec(_spec(service, receiver.url("/x")), unsigned)


def test_failed_and_cancelled_jobs_deliver_their_events(service: ServiceWorkers, receiver: WebhookReceiver) -> None:
    failing_path, cancel_path = f"/failed/{uuid.uuid4().hex[:6]}", f"/cancelled/{uuid.uuid4().hex[:6]}"
    failing = submit({**_spec(service, receiver.url(failing_path)),
                      "content": f"s3://{service.bucket}/in/missing.png"}, app=service.app)
    long = submit(_spec(service, receiver.url(cancel_path), ["started", "cancelled"], iterations=100_000),
                  app=service.app)
    wait_for(lambda: receiver.received(cancel_path), 60, "the started delivery")  # it is running
    long.cancel()
    for job, path, status in ((failing, failing_path, "failed"), (long, cancel_path, "cancelled")):
        record = _ended(job)
        got = wait_for(lambda: [r for r in receiver.received(path) if r.json()["type"] == f"job.{status}"], 30,
                       f"the {status} delivery")
        (data,) = [_verified(r)["data"] for r in got]
        assert data["status"] == status == record["status"] and data["result_uri"] is None
        assert data["error"] == record["error"] and data["error"]
    assert "ObjectNotFoundError" in failing.history()["error"] and "missing.png" in failing.history()["error"]
    assert [r.json()["type"] for r in receiver.received(cancel_path)] == ["job.started", "job.cancelled"]
    assert receiver.received(failing_path)[0].json()["data"]["started_at"] is None  # failed at validate
