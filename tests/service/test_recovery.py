"""Lost-message recovery (stylequeue.scheduler.recovery) against a real Redis, S3 and celery workers.

A message the broker loses cannot be produced on demand by a Redis restart (the window is a few
microseconds wide; test_faults.py restarts Redis under load and relies on this sweep), so these
tests lose messages the way the loss looks afterwards: the task's message is on no Redis list and
in no ``unacked`` entry. The queue's consumer is stopped first so the message waits where the test
can take it away; the sweep must then leave queued work alone, re-send what is really gone after
the grace, keep chains and chords intact, and fail a job whose message keeps vanishing.
"""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from stylequeue.exceptions import JobFailedError
from stylequeue.job import JobStatus
from stylequeue.scheduler import submit, submit_batch
from stylequeue.tasks.control import JobControl
from stylequeue.scheduler.recovery import Recovery
from testbed.workers import Beat
from tests.service.fault_stack import Stack, job_spec, start_stack, wait_for

pytestmark = pytest.mark.timeout(180)

# Recovery's grace must exceed the job time limit (a busy worker may hold a message that long);
# the limits stay loose enough for a loaded 2-core machine. The sweeps the tests call directly
# look GRACE_S ahead on their clock (``later``) instead of sleeping; the beat test waits for real.
GRACE_S = 21
ENV = {
    "STYLEQUEUE_JOB_TIME_LIMIT": "20",
    "STYLEQUEUE_JOB_SOFT_TIME_LIMIT": "15",
    "STYLEQUEUE_VISIBILITY_TIMEOUT": "30",
    "STYLEQUEUE_RECOVER_AFTER_S": str(GRACE_S),
    "STYLEQUEUE_MAX_DELIVERIES": "2",
}


def later() -> float:
    """A clock past the grace, for a sweep that should act on what an earlier sweep noted."""
    return time.time() + GRACE_S + 1


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory) -> Iterator[Stack]:
    with start_stack(s3_server, tmp_path_factory.mktemp("recovery"), versioned=True, extra_env=ENV) as stack:
        stack.put_samples()
        yield stack


@pytest.fixture
def rs(stack: Stack) -> Iterator[Stack]:
    """The stack with every worker running again after the test (tests stop one of them)."""
    yield stack
    down = [w for w in stack.workers if not w.running]
    for worker in down:
        worker.launch()
    for worker in down:
        worker.wait_ready()


def lose(fs: Stack, task_id: str) -> None:
    """Take ``task_id``'s message off every Redis list, as a broker restart at the wrong moment does."""
    client = fs.redis.client(0)
    removed = 0
    for key in client.keys("*"):
        if client.type(key) == b"list":
            for raw in client.lrange(key, 0, -1):
                if json.loads(raw)["headers"]["id"] == task_id:
                    removed += client.lrem(key, 1, raw)
    assert removed == 1, f"{task_id} was not waiting on exactly one list"
    assert task_id not in fs.on_broker()


def sweep_until_resent(fs: Stack, task_id: str) -> list[dict]:
    """Sweep once now (the message is found missing), then after the grace (it is re-sent)."""
    first = Recovery(fs.app).sweep()
    assert first.missing >= 1 and task_id not in first.resent, first
    second = Recovery(fs.app, now=later).sweep()
    assert task_id in second.resent, second
    return [first.as_dict(), second.as_dict()]


def test_a_lost_message_is_sent_again_and_the_job_completes_once(rs: Stack) -> None:
    """A message a worker sent down the chain (``stylize.0``, sent when ``validate`` ended)
    vanishes: the sweep waits out the grace, sends it again under the same task id, and the job
    completes with one result.json. (A lost first message, sent by the producer, is the chord
    test's case below; a cancelled job leaving the index is in test_cli_service.py.)"""
    rs.gpu[0].stop()
    job = submit(job_spec(rs.content, rs.style), app=rs.app)
    task_id = f"{job.job_id}.stylize.0"
    wait_for(lambda: task_id in rs.on_broker(), 60, f"{task_id} queued", logs=rs.logs)
    lose(rs, task_id)
    sweep_until_resent(rs, task_id)
    assert task_id in rs.on_broker()
    rs.gpu[0].start()
    summary = job.wait(timeout=90)
    assert summary["status"] == "succeeded"
    assert rs.versions(summary["metadata_uri"]) == 1
    assert rs.get(summary["result_uri"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert job.job_id not in JobControl(rs.app).active_jobs()  # publish stopped tracking it


def test_queued_work_is_left_alone(rs: Stack) -> None:
    """Jobs waiting for a stopped worker far past the grace are not re-sent: nothing runs twice.
    The sweep sees them in kombu's priority sub-lists, and taken messages in ``unacked``."""
    rs.gpu[0].stop()
    jobs = [submit({**job_spec(rs.content, rs.style), "priority": p}, app=rs.app) for p in (0, 2, 5)]
    ids = [f"{j.job_id}.stylize.0" for j in jobs]
    wait_for(lambda: set(ids) <= rs.on_broker(), 60, "every stylize.0 queued", logs=rs.logs)
    client = rs.redis.client(0)
    assert sum(1 for k in client.keys(f"{rs.settings.gpu_queue}*") if b"\x06\x16" in k) == 2  # steps 2, 5
    client.hset("unacked", "tag-1", json.dumps([{"headers": {"id": "taken.elsewhere"}}, "gpu", "gpu"]))
    try:
        assert "taken.elsewhere" in rs.on_broker()
    finally:
        client.hdel("unacked", "tag-1")
    reports = [Recovery(rs.app).sweep(), Recovery(rs.app, now=later).sweep()]
    assert all(not r.resent and not r.failed for r in reports), reports
    assert reports[-1].on_broker >= 3
    rs.gpu[0].start()
    for job in jobs:
        summary = job.wait(timeout=90)
        assert rs.versions(summary["metadata_uri"]) == 1
    deliveries = [rs.gpu[0].log_text().count(f"[{tid}] received") for tid in ids]
    assert deliveries == [1, 1, 1], deliveries


def test_a_resent_message_keeps_its_chord(rs: Stack) -> None:
    """A batch job's first message is lost: the copy carries the rest of the chain and the chord,
    so the batch's contact sheet is still made once every job has published."""
    rs.light.stop()
    batch = submit_batch([rs.content], [rs.style, rs.content], app=rs.app, params={"size": 32, "iterations": 2})
    lost = f"{batch.jobs[1].job_id}.validate"
    wait_for(lambda: lost in rs.on_broker(), 30, "the batch queued", logs=rs.logs)
    lose(rs, lost)
    sweep_until_resent(rs, lost)
    rs.light.start()
    sheet = batch.wait(timeout=120)
    assert sorted(sheet["jobs"]) == sorted(j.job_id for j in batch.jobs)
    assert all(rs.versions(j.metadata_uri) == 1 for j in batch.jobs)
    assert rs.get(sheet["sheet_uri"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_message_lost_too_often_fails_its_job(rs: Stack) -> None:
    """Lost, re-sent, lost again past max_deliveries (2 here): the job ends FAILED saying so."""
    rs.light.stop()
    job = submit(job_spec(rs.content, rs.style), app=rs.app)
    task_id = f"{job.job_id}.validate"
    for _ in range(2):
        lose(rs, task_id)
        sweep_until_resent(rs, task_id)
    lose(rs, task_id)
    Recovery(rs.app).sweep()
    report = Recovery(rs.app, now=later).sweep()
    assert report.failed == [task_id], report
    assert job.status() is JobStatus.FAILED
    with pytest.raises(JobFailedError, match="lost 3 times"):
        job.wait(timeout=5)
    Recovery(rs.app).sweep()
    assert job.job_id not in JobControl(rs.app).active_jobs()


def test_beat_recovers_a_lost_message_unattended(rs: Stack, tmp_path) -> None:
    """`stylequeue beat` sends the sweep every second; the light worker runs it; nobody calls it."""
    rs.gpu[0].stop()
    job = submit(job_spec(rs.content, rs.style), app=rs.app)
    task_id = f"{job.job_id}.stylize.0"
    wait_for(lambda: task_id in rs.on_broker(), 60, f"{task_id} queued", logs=rs.logs)
    lose(rs, task_id)
    with Beat({**rs.env, "STYLEQUEUE_RECOVER_EVERY_S": "1"}, tmp_path / "beat") as beat:
        wait_for(lambda: task_id in rs.on_broker(), GRACE_S + 30, "beat's sweep to re-send it",
                 logs=lambda: rs.logs() + beat.log_text())
        rs.gpu[0].start()
        assert job.wait(timeout=90)["status"] == "succeeded"
    assert "sending it again (1/2)" in rs.light.log_text()
