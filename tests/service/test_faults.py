"""Faults caused for real (issue 4): killed workers, warm shutdown, a restarted broker, storage
outages, time limits and a poison job, against real redis-server, S3 and celery worker processes.

One stack per module: a durable Redis (appendonly, as deployed) of its own, TWO GPU workers (one
to kill, one to take over), a light worker and `stylequeue beat` (its lost-message recovery sweep
runs every 2 s). Settings are scaled down so each fault shows in
seconds: a 16 s visibility timeout (jobs here last a few seconds; the time limits stay below it,
as ``_check_limits`` demands), checkpoints every 2 iterations, small retry budgets. Each test
leaves the stack as it found it (a killed worker is started again), and every job is checked
where a user would look: its state, result.json in S3, and the workers' logs.
"""

from __future__ import annotations

import signal
import time
import uuid
from datetime import datetime

from typing import Iterator

import pytest

from stylequeue.exceptions import JobFailedError
from stylequeue.job import JobStatus
from stylequeue.scheduler import submit
from stylequeue.scheduler.jobs import JobHandle, build_chain, task_ids
from stylequeue.job import JobPaths, JobSpec
from tests.service.fault_stack import (
    Stack,
    job_spec,
    pid_alive,
    pids_of_children,
    start_stack,
    wait_for,
    workers_up,
)

pytestmark = pytest.mark.timeout(240)

POISON_ID = f"poison-{uuid.uuid4().hex[:8]}"
VISIBILITY_TIMEOUT = 16
ENV = {
    "STYLEQUEUE_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    "STYLEQUEUE_JOB_TIME_LIMIT": "15",
    "STYLEQUEUE_JOB_SOFT_TIME_LIMIT": "12",
    "STYLEQUEUE_MAX_DELIVERIES": "3",
    "STYLEQUEUE_TASK_MAX_RETRIES": "3",
    # One attempt rides out ~4 s of outage by itself (0.25 + 0.5 + 1 + 2 s, plus jitter).
    "STYLEQUEUE_STORAGE_RETRIES": "4",
    "STYLEQUEUE_STORAGE_BACKOFF_S": "0.25",
    # Read by the harness plugin testbed.poison in the GPU workers (not imported here: it connects
    # a signal in whatever process imports it): the stylize task of this job kills its process.
    "STYLEQUEUE_TEST_CRASH_ON": POISON_ID,
    # Beat runs beside the workers, as deployed; its recovery sweep every 2 s (grace: the
    # visibility timeout) re-sends a message lost in a broker restart.
    "STYLEQUEUE_RECOVER_EVERY_S": "2",
}


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory) -> Stack:
    with start_stack(s3_server, tmp_path_factory.mktemp("faults"), gpu_workers=2, appendonly=True,
                     gpu_args=["--include", "testbed.poison"], versioned=True, extra_env=ENV,
                     beat=True) as stack:
        stack.put_samples()
        yield stack


@pytest.fixture
def fs(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack, with every worker up (restarting any a test killed); logs on failure."""
    yield from workers_up(stack, request)


def _spec(fs: Stack, **params) -> dict:
    return job_spec(fs.content, fs.style, **params)


def _worker_running(fs: Stack, task_id: str):
    """The GPU worker whose log shows it received ``task_id`` most recently."""
    marks = [(w.log_text().rfind(f"[{task_id}] received"), w) for w in fs.gpu]
    pos, worker = max(marks, key=lambda m: m[0])
    return worker if pos >= 0 else None


def _received_at(worker, task_id: str) -> float:
    """When ``worker`` logged receiving ``task_id`` (its first such line), as a timestamp."""
    for line in worker.log_text().splitlines():
        if f"[{task_id}] received" in line:
            stamp = line[1:].split(": ", 1)[0]  # "[2026-11-28 16:27:43,636: INFO/MainProcess] ..."
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"{worker.hostname} never received {task_id}")


def _log_marks(fs: Stack) -> dict[str, int]:
    return {w.hostname: len(w.log_text()) for w in fs.workers}


def _logs_since(fs: Stack, marks: dict[str, int]) -> str:
    """What the workers logged since ``marks`` (the module's logs hold earlier tests' lines too)."""
    return "\n".join(w.log_text()[marks.get(w.hostname, 0):] for w in fs.workers)


def _ok(fs: Stack, timeout: float = 120) -> None:
    """The service still serves: a small job submitted now succeeds."""
    summary = submit(_spec(fs), app=fs.app).wait(timeout=timeout)
    assert summary["status"] == "succeeded"


# --- worker death ------------------------------------------------------------------------------

def test_dead_workers_jobs_are_swept_soon_after_the_visibility_timeout() -> None:
    """kombu's default sweep for dead workers' messages runs about every 100 s; ours follows the
    visibility timeout (an eighth of it, 1 to 60 s), so redelivery waits little past the timeout."""
    from stylequeue.settings import Settings
    from stylequeue.tasks.app import celery_config

    for timeout, interval in ((16, 2), (7200, 60), (9, 1)):
        settings = Settings(broker_url="redis://127.0.0.1:1/0", visibility_timeout=timeout,
                            job_time_limit=timeout - 1, job_soft_time_limit=timeout - 2)
        options = celery_config(settings)["broker_transport_options"]
        assert options["unacked_restore_interval"] == interval
        assert options["unacked_restore_throttle"] == 1
        assert options["unacked_mutex_expire"] == max(10, 2 * interval)  # kombu's default: 300 s


def test_sigkill_of_a_whole_worker_mid_job_redelivers_and_resumes(fs: Stack) -> None:
    """The node failure: the worker's main process is SIGKILLed mid-job (its pool child dies with
    it). The message stays in kombu's unacked hash; after the visibility timeout another worker
    restores and runs it, resuming from the last checkpoint; result.json is written exactly once.
    A stale restore lock (what a Redis restart mid-sweep leaves) delays this by seconds, not minutes."""
    job = submit(_spec(fs, iterations=14), app=fs.app)
    stylize_id = job.task_ids[1]
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 5, 90, "five iterations", logs=fs.logs)
    victim = wait_for(lambda: _worker_running(fs, stylize_id), 10, "the worker running the job")
    survivor = next(w for w in fs.gpu if w is not victim)
    children = pids_of_children(victim.proc.pid)
    # A restore lock left behind as a broker restart leaves it (held by a sweep whose connection
    # died), with the expiry our workers set on it; kombu's own 300 s would stall every restore
    # past this test's wait.
    lock_s = fs.app.conf.broker_transport_options["unacked_mutex_expire"]
    fs.redis.client(0).set("unacked_mutex", "left-by-a-dead-sweep", px=lock_s * 1000)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    # The pool child has PR_SET_PDEATHSIG=SIGKILL: it dies with its parent, it does not finish alone.
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the pool child to die")

    summary = job.wait(timeout=VISIBILITY_TIMEOUT + 90)
    assert summary["status"] == "succeeded"
    # Redelivered by the visibility timeout, which counts from the first delivery (not the kill),
    # and not sooner: the two workers' "received" lines, on one clock.
    first, again = _received_at(victim, stylize_id), _received_at(survivor, stylize_id)
    assert again - first >= VISIBILITY_TIMEOUT - 1, (first, again)
    meta = fs.get_json(summary["metadata_uri"])
    step = meta["steps"][0]
    assert step["started_from"] == "resumed" and step["resumed_from_iteration"] >= 4, step
    assert step["iterations_done"] == 14
    assert fs.versions(summary["metadata_uri"]) == 1  # one complete result, written once
    assert fs.versions(summary["result_uri"]) == 1


def test_warm_shutdown_finishes_the_running_job(fs: Stack) -> None:
    """SIGTERM (Kubernetes, Compose): Celery's warm shutdown lets the running job finish."""
    job = submit(_spec(fs, iterations=8), app=fs.app)
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 2, 90, "the job to run", logs=fs.logs)
    worker = wait_for(lambda: _worker_running(fs, job.task_ids[1]), 10, "the worker running the job")
    worker.terminate()
    assert worker.proc.wait(timeout=60) == 0
    assert f"[{job.task_ids[1]}] succeeded" in worker.log_text()
    assert job.wait(timeout=60)["status"] == "succeeded"
    assert fs.versions(job.metadata_uri) == 1


# --- broker ------------------------------------------------------------------------------------

def test_redis_restart_with_jobs_queued_and_running(fs: Stack) -> None:
    """Redis goes away for a few seconds and comes back (appendonly: the queue survives). Workers
    and the producer reconnect; every job, queued or running at the time, ends SUCCEEDED.

    A message a worker had just taken when Redis stopped can be lost (kombu writes it to
    ``unacked`` after BRPOP returns); beat's recovery sweep sends it again after the grace
    (the 16 s visibility timeout here), so such a job ends too, later."""
    jobs = [submit(_spec(fs, iterations=14), app=fs.app) for _ in range(4)]
    # Past a checkpoint (every 2 iterations) and well before the end: Redis goes away mid-job.
    wait_for(lambda: any((p := j.progress()) and 3 <= p["iteration"] <= 8 for j in jobs), 90,
             "a job past its first checkpoint", interval=0.05, logs=fs.logs)
    fs.redis.stop()
    time.sleep(3)
    fs.redis.start()
    later = submit(_spec(fs), app=fs.app)  # the producer's connection comes back too
    started_from = []
    for job in [*jobs, later]:
        try:
            summary = job.wait(timeout=VISIBILITY_TIMEOUT + 120)
        except TimeoutError:  # say where the job's messages are, for the next person to read
            client = fs.redis.client(0)
            unacked = [t for t in job.task_ids if any(t.encode() in v for v in client.hvals("unacked"))]
            raise AssertionError(
                f"{job.job_id} stuck; its task ids on the broker: {sorted(set(job.task_ids) & fs.on_broker())}"
                f", of which in unacked: {unacked}; restore lock TTL: {client.pttl('unacked_mutex')} ms"
                f"\n{fs.logs()}") from None
        assert summary["status"] == "succeeded", fs.logs()
        assert fs.versions(job.metadata_uri) == 1
        started_from.append(fs.get_json(job.metadata_uri)["steps"][0]["started_from"])
    # A job running when Redis went away was terminated by Celery on the connection loss and
    # redelivered after the visibility timeout (from the durable unacked hash): it resumed.
    assert "resumed" in started_from, started_from
    assert all(w.running for w in fs.workers)


# --- storage -----------------------------------------------------------------------------------

def test_storage_outage_is_retried_and_the_job_completes(fs: Stack) -> None:
    """S3 refuses connections for 6 s in the middle of a job: storage calls back off and retry,
    the task retries from its checkpoint, and the job completes once S3 is back."""
    marks = _log_marks(fs)
    job = submit(_spec(fs, iterations=10), app=fs.app)
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 3, 90, "the job to run", logs=fs.logs)
    fs.s3_server.stop()
    time.sleep(6)
    fs.s3_server.start()
    summary = job.wait(timeout=120)
    assert summary["status"] == "succeeded"
    logs = _logs_since(fs, marks)
    assert "failed: cannot reach S3" in logs and "retry 1/4" in logs  # backed off, not hammered
    assert fs.versions(summary["metadata_uri"]) == 1


def test_storage_5xx_within_the_budget_is_retried(fs: Stack) -> None:
    """Injected HTTP 503 SlowDown answers (S3 throttling) are retried with backoff."""
    job_id = f"slow-{uuid.uuid4().hex[:8]}"
    before = fs.s3_server.faults.injected
    fs.s3_server.fail_next(3, 503, "SlowDown")
    summary = submit(job_spec(fs.content, fs.style, job_id=job_id), app=fs.app).wait(timeout=120)
    assert summary["status"] == "succeeded"
    assert fs.s3_server.faults.injected - before == 3  # all three were served, and retried


def test_storage_down_past_the_retry_budget_fails_clearly(fs: Stack) -> None:
    """Every S3 request fails: after storage retries x task retries the job is FAILED, saying why."""
    fs.s3_server.fail_next(10_000, 503, "SlowDown")
    try:
        job = submit(_spec(fs), app=fs.app)
        with pytest.raises(JobFailedError) as info:
            job.wait(timeout=120)
    finally:
        fs.s3_server.fail_next(0)
    assert job.status() is JobStatus.FAILED
    message = str(info.value)
    assert "TransientStorageError" in message and "gave up after 5 attempts" in message, message
    assert "STYLEQUEUE_STORAGE_RETRIES" in message
    _ok(fs)


# --- limits ------------------------------------------------------------------------------------

def _submit_with_limits(fs: Stack, soft: float | None, hard: float) -> JobHandle:
    """A job whose stylize step runs under its own (short) Celery time limits."""
    spec = JobSpec.parse(_spec(fs, iterations=100_000), fs.settings)
    ids = task_ids(spec.job_id, 1)
    work = build_chain(fs.app, spec, ids)
    limits = {"time_limit": hard, **({"soft_time_limit": soft} if soft else {})}
    work.tasks[1].set(**limits)
    work.apply_async()
    paths = JobPaths.for_spec(spec, fs.settings)
    return JobHandle(spec.job_id, fs.app, ids, paths.result, paths.metadata)


@pytest.mark.parametrize("soft,hard", [(3, 10), (None, 3)], ids=["soft-limit", "hard-limit"])
def test_a_job_past_its_time_limit_is_timed_out_and_the_worker_goes_on(fs: Stack, soft, hard) -> None:
    job = _submit_with_limits(fs, soft, hard)
    wait_for(lambda: job.status() is JobStatus.TIMED_OUT, 90, "TIMED_OUT", interval=0.25, logs=fs.logs)
    with pytest.raises(JobFailedError, match="timed_out"):
        job.wait(timeout=5)
    assert "time limit" in (job.error() or "").lower() or "TimeLimitExceeded" in (job.error() or "")
    # The history hears of it from JobTask.on_failure (for the hard limit, in the worker's main
    # process; billiard may signal the soft limit to the child in the same instant, and the first
    # to write wins); this job was sent without submit(), so its record is made from the message.
    record = wait_for(lambda: (job.history() or {}).get("status") == "timed_out" and job.history(), 10, "history")
    assert record["error"].startswith(("JobTimeoutError", "TimeLimitExceeded")) and record["started_at"]
    _ok(fs)


def test_a_poison_job_stops_after_max_deliveries_and_others_complete(fs: Stack) -> None:
    """A job that kills its worker process every time is FAILED after ``max_deliveries``."""
    marks = _log_marks(fs)
    poison = submit(_spec(fs) | {"job_id": POISON_ID}, app=fs.app)
    others = [submit(_spec(fs), app=fs.app) for _ in range(2)]
    with pytest.raises(JobFailedError) as info:
        poison.wait(timeout=180)
    assert poison.status() is JobStatus.FAILED
    message = str(info.value)
    assert "TooManyDeliveriesError" in message and "delivered 4 times (limit 3)" in message, message
    assert poison.history()["status"] == "failed" and "TooManyDeliveriesError" in poison.history()["error"]
    for job in others:
        assert job.wait(timeout=120)["status"] == "succeeded"
    assert all(w.running for w in fs.workers)
    logs = _logs_since(fs, marks)
    assert logs.count(f"stylequeue.stylize[{poison.task_ids[1]}] received") == 4  # 3 deaths + the refusal
    crashes = [line for line in logs.splitlines()
               if "Process 'ForkPoolWorker" in line and "exited with" in line]
    assert len(crashes) >= 3, crashes
