"""Re-send job messages that the broker lost: the sweep behind ``stylequeue.recover`` (beat).

Late acknowledgement covers a worker that dies with a job: its message stays in kombu's
``unacked`` hash and comes back after the visibility timeout. It does not cover a message that
the broker handed to a worker which had not yet written it to ``unacked`` when the connection
broke (a Redis restart at the wrong millisecond, see :mod:`stylequeue.tasks.sent`): that message
is gone, and its job would wait forever. The sweep finds such jobs and sends the message again.

For each job that has not ended (``JobControl.active_jobs``), the task the job waits on is the
first in its chain that has not succeeded (for a tiled pass: its first unfinished tile). That task's message must be somewhere: in a queue
list or in ``unacked`` (read in one transaction, :func:`task_ids_on_broker`). A message missing
from both for longer than ``recover_after_s`` (default: the visibility timeout, which exceeds the
longest job) is lost, not merely in transit, and is sent again from its remembered copy, with
the same task id, so the job resumes from its checkpoint. A message lost more than
``max_deliveries`` times fails its job with a :class:`LostMessageError` instead: every job ends.

The same sweep notices dead workers in seconds rather than at the visibility timeout (hours):
a stylize step that a worker started (its state STARTED or PROGRESS, a lease taken) and whose
lease has lapsed (tasks/lease.py: the heartbeat stopped with its worker) is sent again at once,
unless its message is back on a queue already; another worker takes the lease and resumes the
job's checkpoint. The dead worker's own copy of the message, which Redis restores much later,
finds the job done (or its lease held) and does nothing.

Only a Redis broker can lose messages this way and only its keys can be inspected; with any
other broker the sweep reports ``skipped``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from celery import Celery
from celery.result import AsyncResult

from stylequeue.exceptions import LostMessageError
from stylequeue.scheduler.jobs import JobHandle
from stylequeue.settings import Settings
from stylequeue.tasks.app import settings_of
from stylequeue.tasks.broker import broker_redis, is_redis_broker, queue_keys, queued_and_taken
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.lifecycle import job_event
from stylequeue.tasks.sent import resend

log = logging.getLogger(__name__)

LOCK = "recovery"
REDRIVE_HEADER = "stylequeue_redrive"
RUNNING = frozenset({"STARTED", "PROGRESS"})


@dataclass
class SweepReport:
    """What one sweep saw and did (the task's return value, so Flower shows it)."""

    active: int = 0  # jobs that had not ended when the sweep began
    ended: int = 0  # jobs found finished, now no longer tracked
    on_broker: int = 0  # jobs whose next message is queued or being worked on
    missing: int = 0  # next message on no queue, for less than the grace so far
    resent: list[str] = field(default_factory=list)  # task ids sent again
    lease_lapsed: list[str] = field(default_factory=list)  # of those: running steps whose worker died
    failed: list[str] = field(default_factory=list)  # task ids failed as lost too often
    skipped: str = ""  # why nothing was looked at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recovery:
    """One sweep over the active jobs; ``now`` is injectable (tests look past the grace)."""

    def __init__(self, app: Celery, *, now: Callable[[], float] = time.time) -> None:
        self.app = app
        self.settings: Settings = settings_of(app)
        self.control = JobControl(app)
        self.now = now

    def broker_ids(self) -> set[str]:
        queued, taken = self.queued_and_taken()
        return queued | taken

    def queued_and_taken(self) -> tuple[set[str], set[str]]:
        options = self.app.conf.broker_transport_options
        with broker_redis(self.settings.resolved_broker_url, options, "lost-message recovery") as client:
            return queued_and_taken(client, [self.settings.gpu_queue, self.settings.light_queue],
                                    queue_keys(options))

    def sweep(self) -> SweepReport:
        report = SweepReport()
        if not is_redis_broker(self.settings.resolved_broker_url):
            report.skipped = "the broker is not Redis; it cannot lose messages this way"
            return report
        # Two beats, or a slow sweep overlapping the next: one at a time.
        if not self.control.lock(LOCK, ttl_s=max(60, 2 * self.settings.recover_every_s)):
            report.skipped = "another sweep is running"
            return report
        try:
            self._sweep(report)
        finally:
            self.control.unlock(LOCK)
        if report.resent or report.failed:
            log.warning("recovery: re-sent %s, failed %s", report.resent, report.failed)
        return report

    def _sweep(self, report: SweepReport) -> None:
        jobs = self.control.active_jobs()
        report.active = len(jobs)
        # The broker is read after the job list: a job submitted in between is simply on it.
        queued, taken = self.queued_and_taken()
        present = queued | taken
        lost: list[tuple[str, str]] = []
        dead: list[tuple[str, str]] = []
        for job_id in jobs:
            waiting = self._waiting(job_id)
            if not waiting:
                self.control.untrack(job_id)
                report.ended += 1
            for waiting_on, state in waiting:
                if waiting_on not in queued and self._lease_lapsed(waiting_on, state):
                    dead.append((job_id, waiting_on))
                elif waiting_on in present:
                    self.control.clear_missing(waiting_on)
                    report.on_broker += 1
                elif (now := self.now()) - self.control.missing_since(waiting_on, now) < self.grace_s:
                    report.missing += 1
                else:
                    lost.append((job_id, waiting_on))
        if not lost and not dead:
            return
        # Look once more before acting: a message that moved between reads is not lost, and a
        # step whose worker took the lease again meanwhile is not dead.
        queued, taken = self.queued_and_taken()
        for job_id, task_id in lost:
            if task_id in queued | taken or task_id not in self._waiting_on(job_id):
                self.control.clear_missing(task_id)
                report.on_broker += 1
            else:
                self._recover(job_id, task_id, report, f"was on no queue for over {self.grace_s} s",
                              f"the broker lost the message of {task_id}", "it was lost")
        for job_id, task_id in dead:
            state = dict(self._waiting(job_id)).get(task_id)
            if task_id in queued or state is None or not self._lease_lapsed(task_id, state):
                report.on_broker += 1
                continue
            # Marked unleased until a worker starts the step again: a re-sent message that waits
            # in a busy worker's prefetch is not taken for another dead one.
            self.control.forget_leased(task_id)
            report.lease_lapsed.append(task_id)
            self._recover(job_id, task_id, report, "was running on a worker whose lease lapsed (it died)",
                          f"{task_id} ran on a worker that died", "its worker died")

    @property
    def grace_s(self) -> int:
        return self.settings.resolved_recover_after_s

    def _waiting_on(self, job_id: str) -> list[str]:
        return [task_id for task_id, _ in self._waiting(job_id)]

    def _waiting(self, job_id: str) -> list[tuple[str, str]]:
        """(task id, state) of each task whose message the job needs now: the first of its chain
        that has not succeeded, or a tiled pass's unfinished tiles (they run at once); [] when the
        job has ended."""
        record = self.control.record(job_id)
        if record is None:
            return []  # expired with the results, or released for a resubmission
        handle = JobHandle.from_record(self.app, job_id, record)
        if handle.status().is_finished:
            return []
        tile_ids = handle.tile_ids()
        for task_id in handle.task_ids:
            state = AsyncResult(task_id, app=self.app).state
            if state == "SUCCESS":
                continue
            # A tiled pass's planner became a chord: the job waits on its tiles (each a message
            # of its own, leased while it runs), then on the blend under the planner's id.
            tile_pass = int(task_id.rsplit(".", 1)[1]) if ".tiles." in task_id else None
            tiles = [(t, AsyncResult(t, app=self.app).state) for t in tile_ids.get(tile_pass, [])] if tile_pass is not None else []
            unfinished = [(t, st) for t, st in tiles if st != "SUCCESS"]
            return unfinished or [(task_id, state)]
        return []

    def _lease_lapsed(self, task_id: str, state: str) -> bool:
        """A step a worker ran under a lease, with no lease now: its worker died."""
        return (state in RUNNING and self.control.was_leased(task_id)
                and self.control.lease_holder(task_id) is None)

    def _recover(self, job_id: str, task_id: str, report: SweepReport, why_now: str, what: str,
                 again: str) -> None:
        self.control.clear_missing(task_id)
        message = self.control.sent_message(task_id)
        count = self.control.count_redrive(task_id)
        if message is None or count > self.settings.max_deliveries:
            why = ("no copy of it was kept" if message is None
                   else f"{again} {count} times (limit {self.settings.max_deliveries})")
            error = LostMessageError(
                f"{what} and {why}; the job is failed rather than left waiting: see the worker logs, "
                f"then resubmit job {job_id}"
            )
            self.app.backend.mark_as_failure(task_id, error)
            job_event(self.app, job_id, "failed", error=f"{type(error).__name__}: {error}")
            report.failed.append(task_id)
            log.error("recovery: %s", error)
            return
        log.warning("recovery: %s (job %s) %s; sending it again (%d/%d)", task_id, job_id, why_now, count,
                    self.settings.max_deliveries)
        resend(self.app, message, headers={REDRIVE_HEADER: count})
        report.resent.append(task_id)


def recover(app: Celery) -> dict[str, Any]:
    """One sweep; what ``stylequeue.recover`` runs and returns."""
    return Recovery(app).sweep().as_dict()
