"""The base every stylequeue task shares: bounded deliveries, retries, time limits, cancellation.

* a message delivered more than ``max_deliveries`` times is failed without running (a job that
  kills its worker cannot loop);
* :class:`TransientStorageError` is retried with backoff, every other error fails at once;
* a task past its soft time limit fails as :class:`JobTimeoutError`, in words;
* :meth:`JobTask.cancel_now` ends a task as REVOKED ("cancelled") and stops its chain.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from stylequeue.exceptions import JobTimeoutError, StyleQueueError, TooManyDeliveriesError, TransientStorageError
from stylequeue.tasks.app import app, settings_of
from stylequeue.tasks.control import JobControl

log = logging.getLogger(__name__)
settings = settings_of(app)

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
        raise Ignore()

    def check_cancelled(self, job_id: str) -> None:
        if JobControl(self.app).is_cancelled(job_id):
            self.cancel_now(job_id)
