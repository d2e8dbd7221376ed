"""Dead workers noticed in seconds, not hours (issue 13): leases, fencing and draining, with real
celery workers killed, paused and stopped, a real Redis and S3, and beat sweeping.

The module's stack runs at the deployment's default visibility timeout (7200 s), lease (20 s) and
sweep interval (10 s): without leases a SIGKILLed worker's job would wait two hours.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Iterator

import pytest

from stylequeue.scheduler import submit
from stylequeue.settings import Settings
from stylequeue.tasks.control import JobControl
from tests.service.fault_stack import (
    Stack,
    job_spec,
    pid_alive,
    pids_of_children,
    start_stack,
    wait_for,
    workers_up,
)

pytestmark = pytest.mark.timeout(300)
DEFAULTS = Settings()


@pytest.fixture(scope="module")
def ls(s3_server, tmp_path_factory) -> Stack:
    # A short grace (the default is 25 s) so the hand-back test's job surely cannot finish in it.
    env = {"STYLEQUEUE_CHECKPOINT_EVERY": "25", "STYLEQUEUE_PROGRESS_EVERY": "5", "STYLEQUEUE_SHUTDOWN_GRACE_S": "2"}
    with start_stack(s3_server, tmp_path_factory.mktemp("leases"), gpu_workers=2, versioned=True,
                     extra_env=env, beat=True) as stack:
        assert stack.settings.visibility_timeout == DEFAULTS.visibility_timeout == 7200
        assert (stack.settings.lease_ttl_s, stack.settings.recover_every_s) == (20, 10)
        stack.put_samples()
        yield stack


@pytest.fixture
def fs(ls: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack, with every worker up (restarting any a test killed); logs on failure."""
    yield from workers_up(ls, request)


def _long_job(fs: Stack, iterations: int) -> dict:
    return job_spec(fs.content, fs.style, iterations=iterations, lr=0.001)


def _running_on(fs: Stack, task_id: str):
    """The GPU worker whose lease the job holds now (the lease names its holder's hostname)."""
    def holder():
        lease = JobControl(fs.app).lease_holder(task_id)
        return next((w for w in fs.gpu if lease and lease.startswith(w.hostname + "/")), None)
    return wait_for(holder, 60, f"a worker to hold {task_id}'s lease", logs=fs.logs)


def _received_at(worker, task_id: str, after: float = 0.0) -> float | None:
    for line in worker.log_text().splitlines():
        if f"[{task_id}] received" in line:
            stamp = datetime.strptime(line[1:].split(": ", 1)[0], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= after:
                return stamp
    return None


def test_a_sigkilled_worker_is_noticed_in_seconds_at_default_settings(fs: Stack) -> None:
    """The node dies (SIGKILL of the whole worker): its lease lapses within 20 s, beat's sweep
    sends the step again within 10 s more, and the other worker resumes the checkpoint. Before
    leases: the visibility timeout, two hours."""
    job = submit(_long_job(fs, 300), app=fs.app)
    stylize_id = job.task_ids[1]
    victim = _running_on(fs, stylize_id)
    survivor = next(w for w in fs.gpu if w is not victim)
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 30, 120, "a checkpoint", logs=fs.logs)
    children = pids_of_children(victim.proc.pid)
    killed = time.time()
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the pool child to die")
    again = wait_for(lambda: _received_at(survivor, stylize_id, after=killed), 60,
                     "the job to run again on the other worker", interval=0.2, logs=fs.logs)
    print(f"running again {again - killed:.1f} s after the SIGKILL")
    assert again - killed < 60
    summary = job.wait(timeout=240)
    meta = fs.get_json(summary["metadata_uri"])
    step = meta["steps"][0]
    assert step["worker"] == survivor.hostname and step["started_from"] == "resumed"
    assert step["resumed_from_iteration"] >= 25 and step["iterations_done"] == 300
    assert fs.versions(summary["metadata_uri"]) == 1 and fs.versions(summary["result_uri"]) == 1


def test_a_paused_worker_past_its_lease_writes_nothing_more(fs: Stack) -> None:
    """SIGSTOP (a frozen VM, a long GC pause, a partition): the job moves to the other worker;
    resumed (SIGCONT), the old holder finds its lease taken, stops and writes nothing more."""
    job = submit(_long_job(fs, 300), app=fs.app)
    stylize_id = job.task_ids[1]
    paused = _running_on(fs, stylize_id)
    other = next(w for w in fs.gpu if w is not paused)
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 30, 120, "a checkpoint", logs=fs.logs)
    group = [paused.proc.pid, *pids_of_children(paused.proc.pid)]
    stopped = time.time()
    for pid in group:
        os_kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _received_at(other, stylize_id, after=stopped), 90,
                 "the job to move to the other worker", interval=0.2, logs=fs.logs)
        _running_on(fs, stylize_id)  # the other worker holds the lease now
    finally:
        for pid in group:
            os_kill(pid, signal.SIGCONT)
    summary = job.wait(timeout=240)
    step = fs.get_json(summary["metadata_uri"])["steps"][0]
    assert step["worker"] == other.hostname
    wait_for(lambda: "writes nothing more" in paused.log_text(), 30, "the paused worker to stand down",
             logs=fs.logs)
    assert fs.versions(summary["metadata_uri"]) == 1 and fs.versions(summary["result_uri"]) == 1
    assert fs.versions(job.result_uri.rsplit("/", 1)[0] + "/work/step00.json") == 1  # one writer
    assert paused.running  # it did not crash: it dropped the job and serves on


def test_sigterm_with_too_little_grace_hands_the_job_back(fs: Stack) -> None:
    """A spot preemption: SIGTERM, and the job needs far longer than the grace (2 s here). The worker
    checkpoints at once and hands the message back; the other worker resumes it; the stopped
    worker exits promptly instead of being killed mid-job."""
    job = submit(_long_job(fs, 600), app=fs.app)
    stylize_id = job.task_ids[1]
    leaving = _running_on(fs, stylize_id)
    staying = next(w for w in fs.gpu if w is not leaving)
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 10, 120, "the job to run", logs=fs.logs)
    told = time.time()
    leaving.terminate()
    assert leaving.proc.wait(timeout=30) == 0  # a warm shutdown that did not wait for the job
    assert time.time() - told < 20
    assert "handed back" in leaving.log_text()
    summary = job.wait(timeout=240)
    step = fs.get_json(summary["metadata_uri"])["steps"][0]
    assert step["worker"] == staying.hostname and step["started_from"] == "resumed"
    assert step["resumed_from_iteration"] >= 10


def os_kill(pid: int, sig: int) -> None:
    import os

    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
