"""The base every stylequeue task shares: bounded deliveries, retries, time limits, cancellation.

* a message delivered more than ``max_deliveries`` times is failed without running (a job that
  kills its worker cannot loop);
* :class:`TransientStorageError` is retried with backoff, every other error fails at once;
* a task past its soft time limit fails as :class:`JobTimeoutError`, in words;
* :meth:`JobTask.cancel_now` ends a task as REVOKED ("cancelled") and stops its chain;
* a job's failure, time-out or cancellation, in whichever of its tasks, is a lifecycle event
  (tasks/lifecycle.py): its history record and its webhook hear of it.

And what every task of a job first does: re-validate its message, find its paths and storage
(:func:`load_job`), and see whether the job already completed (:func:`finished_record`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded

from stylequeue.exceptions import (
    JobTimeoutError,
    OutputTakenError,
    StyleQueueError,
    TooManyDeliveriesError,
    TransientStorageError,
)
from stylequeue.job import JobPaths, JobSpec
from stylequeue.tasks.app import app, settings_of
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.lifecycle import job_event
from stylequeue.worker.resources import resources_for

log = logging.getLogger(__name__)
settings = settings_of(app)
resources = resources_for(settings)  # this process's storage, models and caches

CANCELLED_REASON = "cancelled by its producer"


class JobTask(Task):
    """Base for every stylequeue task: bounded deliveries, retries, time limits, cancellation."""

    autoretry_for = (TransientStorageError,)
    # A StyleQueueError is the job's fault (bad input, limits, cancelled): logged in one line,
    # without a traceback; anything else is a bug and keeps its traceback in the log.
    throws = (StyleQueueError,)
    retry_backoff = True
    retry_backoff_max = 120
    retry_jitter = True
    max_retries = settings.task_max_retries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.id and not self.request.is_eager:
            deliveries = JobControl(self.app).count_delivery(self.request.id, self.request.retries or 0)
            if deliveries > settings.max_deliveries:
                raise TooManyDeliveriesError(
                    f"task {self.name}[{self.request.id}] was delivered {deliveries} times (limit "
                    f"{settings.max_deliveries}): its worker died each time, so it is failed instead "
                    "of run again; see the worker logs, fix the cause and resubmit the job"
                )
        try:
            return super().__call__(*args, **kwargs)
        except SoftTimeLimitExceeded:
            raise JobTimeoutError(
                f"task {self.name} ran past its time limit of {settings.job_soft_time_limit} s; "
                "lower the size or iterations, or raise STYLEQUEUE_JOB_SOFT_TIME_LIMIT"
            ) from None

    def cancel_now(self, job_id: str) -> None:
        """End this task as REVOKED (the job is CANCELLED) and stop the chain here."""
        log.info("job %s cancelled; %s stops", job_id, self.name)
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        self.backend.mark_as_revoked(self.request.id, CANCELLED_REASON, request=self.request)
        job_event(self.app, job_id, "cancelled", error=f"job {job_id} was cancelled")
        raise Ignore()

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A job's task failed for good (after its retries): the job is timed_out for a time limit
        (soft, or hard: Celery calls this in the worker's main process then), failed otherwise."""
        message = args[0] if args and isinstance(args[0], dict) and "job_id" in args[0] else None
        if message is None:
            return  # a group's contact sheet or a periodic task: no job of its own
        event = "timed_out" if isinstance(exc, (JobTimeoutError, TimeLimitExceeded)) else "failed"
        job_event(self.app, message, event, error=f"{type(exc).__name__}: {exc}")

    def check_cancelled(self, job_id: str) -> None:
        if JobControl(self.app).is_cancelled(job_id):
            self.cancel_now(job_id)


def load_job(message: dict[str, Any]) -> tuple[JobSpec, JobPaths, Any]:
    """The spec (re-validated here, allow-list included: a worker trusts no message), its paths
    and this process's storage."""
    spec = JobSpec.parse(message, settings)
    return spec, JobPaths.for_spec(spec, settings), resources.storage


def finished_record(store: Any, paths: JobPaths, spec: JobSpec) -> dict[str, Any] | None:
    """The published result.json when this job already completed (idempotent job ids).

    Another job's result.json under this prefix is never taken for this one's: the job fails
    instead of "succeeding" with a picture it did not make, or overwriting one it did not own.
    """
    if not store.exists(paths.metadata):
        return None
    record = json.loads(store.get_bytes(paths.metadata))
    if record.get("job_id") != spec.job_id or record.get("spec_digest", spec.digest()) != spec.digest():
        raise OutputTakenError(
            f"{paths.metadata} holds the result of job {record.get('job_id')!r}"
            f"{'' if record.get('job_id') != spec.job_id else ' under another spec'}, not of this job "
            f"{spec.job_id}: its output prefix is another job's; resubmit with an output of its own"
        )
    return record
