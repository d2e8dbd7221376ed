"""``stylequeue.webhook`` (light queue): POST one lifecycle event to the job's webhook, signed.

The task that emits an event (tasks/lifecycle.py) only queues this one. Each attempt re-checks
the URL against this worker's allow-list and resolves it again (a name that now leads to a private
address is refused), connects to the address it checked, waits at most ``webhook_timeout_s``, and
signs the body with a fresh timestamp under the delivery's one id. A 2xx answer ends the delivery,
and so does 410 Gone (the receiver says it wants no more); anything else (an error, a timeout, a
redirect, another status) is retried by Celery with exponential backoff and jitter (a countdown,
never a sleep in the worker) until ``webhook_retry_for_s`` after the first attempt. Each attempt's
outcome is written into the job's history record (``delivery``).

This is a plain Celery task, not a JobTask: a delivery that fails says so in the history and the
log, never in the job's own status.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from stylequeue.exceptions import StyleQueueError
from stylequeue.tasks.app import TASK_WEBHOOK, app
from stylequeue.tasks.base import resources, settings
from stylequeue.tasks.history import JobHistory
from stylequeue.webhooks import check_url, post, signed_headers

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 600.0


def backoff_s(retries: int) -> float:
    """Exponential with full jitter in its upper half: 0.5-1 s, 1-2 s, 2-4 s, ... at most 10 min."""
    return min(BACKOFF_BASE_S * 2 ** retries, BACKOFF_MAX_S) * random.uniform(0.5, 1.0)


class _Refused(Exception):
    """This worker's settings refuse the delivery (URL no longer allowed, no secret): no retry helps."""


def _with_presigned_url(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``succeeded`` payload with a link to the result that expires (s3 only, when the deployment
    allows one); made once, so every retry sends the same body."""
    data = payload["data"]
    uri = data.get("result_uri") or ""
    if settings.webhook_presign_s <= 0 or not uri.startswith("s3://") or "presigned_url" in data:
        return payload
    try:
        url = resources.storage.presign(uri, settings.webhook_presign_s)
    except StyleQueueError as exc:
        log.warning("no presigned URL for %s in its webhook (%s); the delivery goes without", uri, exc)
        return payload
    return {**payload, "data": {**data, "presigned_url": url, "presigned_expires_s": settings.webhook_presign_s}}


def attempt(delivery: dict[str, Any]) -> tuple[int | None, str | None]:
    """One POST: (HTTP status, None) when the receiver answered, (None, why) when it did not or
    the URL is no longer allowed."""
    body = json.dumps(delivery["payload"], separators=(",", ":"), sort_keys=True).encode()
    try:
        target = check_url(delivery["url"], settings.webhook_allowed, resolve=True)
        headers = signed_headers(settings.webhook_secret, delivery["id"], body)
        return post(target, headers, body, settings.webhook_timeout_s), None
    except (OSError, SoftTimeLimitExceeded) as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except StyleQueueError as exc:  # refused by this worker's settings: retrying cannot help
        raise _Refused(str(exc)) from None


def _note(job_id: str, outcome: dict[str, Any]) -> None:
    """The outcome into the job's history (``delivery``); a store that is down costs only the note."""
    try:
        JobHistory(app).change(job_id, lambda record: {**record, "delivery": outcome} if record else None)
    except Exception as exc:  # noqa: BLE001 - the delivery itself matters more than its note
        log.warning("webhook outcome of job %s not recorded: %s", job_id, exc)


@app.task(bind=True, name=TASK_WEBHOOK, ignore_result=True, max_retries=None,
          soft_time_limit=2 * settings.webhook_timeout_s + 5, time_limit=2 * settings.webhook_timeout_s + 15)
def webhook(self: Task, delivery: dict[str, Any]) -> dict[str, Any]:
    """Light queue: one attempt at one delivery, retried with backoff while the receiver fails."""
    delivery = {**delivery, "payload": _with_presigned_url(delivery["payload"])}
    attempts = (self.request.retries or 0) + 1
    final = False
    try:
        status, error = attempt(delivery)
    except _Refused as exc:
        status, error, final = None, str(exc), True
    delivered = status is not None and 200 <= status < 300
    left = delivery["first_at"] + settings.webhook_retry_for_s - time.time()
    final = final or delivered or status == 410 or left <= 0
    outcome = {"id": delivery["id"], "event": delivery["event"], "attempts": attempts, "http_status": status,
               "error": error, "delivered": delivered, "final": final, "at": time.time()}
    _note(delivery["job_id"], outcome)
    if final:
        level = logging.INFO if delivered else logging.WARNING
        log.log(level, "webhook %s of job %s (%s): %s after %d attempt(s)", delivery["id"], delivery["job_id"],
                delivery["event"], "delivered" if delivered else f"given up ({status or error})", attempts)
        return outcome
    raise self.retry(args=(delivery,), countdown=min(backoff_s(attempts - 1), left), max_retries=None)


__all__ = ["attempt", "backoff_s", "webhook"]
