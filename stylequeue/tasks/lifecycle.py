"""A job's lifecycle events, written once: each changes the job's history record and, when the
job's spec asked for that event, queues a signed webhook delivery on the light queue.

=============  ==========================================================  ==============
event          emitted by                                                  history status
=============  ==========================================================  ==============
submitted      scheduler/jobs.py, when a submit claims the id (a            queued
               resubmission starts a fresh record)
started        tasks/gpu.py, when a GPU task of the job takes its lease     running
               (the webhook hears of the first only)
progress       a stylize step's reporter (tasks/progress.py), at most       running
               every ``webhook_progress_every_s``
succeeded      publish (tasks/chain.py), once result.json is written        succeeded
failed         ``JobTask.on_failure`` (any task of the job, tiles           failed
               included), recovery's ``LostMessageError``
timed_out      ``JobTask.on_failure`` for a soft or hard time limit         timed_out
cancelled      ``JobTask.cancel_now``: a running task stopping, or a        cancelled
               queued one dropped when a worker takes it
=============  ==========================================================  ==============

A job ends once: the first terminal event wins; a later one (another tile's cancel, a redelivered
publish) changes nothing and sends nothing, and no started or progress event moves an ended job
back. :func:`job_event` never raises and never waits on a receiver: a GPU task only writes the
record and enqueues a task; the HTTP is :mod:`stylequeue.tasks.webhook`'s, on a light worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Mapping

from celery import Celery

from stylequeue.job import JobPaths, JobSpec
from stylequeue.tasks.app import TASK_WEBHOOK, settings_of
from stylequeue.tasks.history import JobHistory
from stylequeue.webhooks import TERMINAL_EVENTS

log = logging.getLogger(__name__)

_STATUS = {"submitted": "queued", "started": "running", "progress": "running", **{e: e for e in TERMINAL_EVENTS}}
# What an event may write into the record besides its status and times.
_FIELDS = ("submitted_at", "result_uri", "metadata_uri", "worker", "progress", "error")
_PROGRESS_KEYS = ("iteration", "total", "scale", "num_scales", "its_per_s", "eta_s")
# A broker that is down must not hold the task that emits the event: a few quick tries, then drop it.
_SEND_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

Job = JobSpec | Mapping[str, Any] | str


def job_event(app: Celery, job: Job, event: str, **fields: Any) -> None:
    """Record ``event`` for ``job`` (a spec, its message, or just its id) and queue its webhook.

    Never raises: a job's work matters more than its record, so a failure is logged and dropped.
    """
    message = job if isinstance(job, JobSpec) else (dict(job) if isinstance(job, Mapping) else None)
    job_id = str(job.job_id if isinstance(job, JobSpec) else message.get("job_id") if message else job)
    try:
        now = time.time()
        old, new = JobHistory(app).change(job_id, lambda record: transition(app, record, job_id, message, event,
                                                                            fields, now))
        if new is not None and _wants(old, new, event):
            send_delivery(app, new, event, now)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("job %s: %s event not recorded or not sent: %s", job_id, event, exc)


def transition(app: Celery, record: dict[str, Any] | None, job_id: str, message: JobSpec | Mapping[str, Any] | None,
               event: str, fields: Mapping[str, Any], now: float) -> dict[str, Any] | None:
    """The record after ``event``, or None when it changes nothing (the job already ended)."""
    if event == "submitted" or record is None:
        # A job submitted before the history existed (or queued around submit) gets one now.
        record = new_record(app, job_id, message, now)
    elif record["status"] in TERMINAL_EVENTS:
        return None
    changed = {**record, **{k: v for k, v in fields.items() if k in _FIELDS}, "status": _STATUS[event]}
    if event == "progress":
        changed["progress"] = {k: fields["progress"].get(k) for k in _PROGRESS_KEYS}
    if event in ("started", "progress"):
        changed["started_at"] = record.get("started_at") or now
    if event in TERMINAL_EVENTS:
        changed["ended_at"] = now
    return changed


def new_record(app: Celery, job_id: str, message: JobSpec | Mapping[str, Any] | None, now: float) -> dict[str, Any]:
    """A queued job's record: what it asked for, where its result goes, who hears of it (from the
    spec, or its message: a task's argument)."""
    record: dict[str, Any] = {
        "job_id": job_id, "status": "queued", "spec": None, "submitted_at": now, "started_at": None,
        "ended_at": None, "worker": None, "result_uri": None, "metadata_uri": None, "error": None,
        "progress": None, "webhook": None, "delivery": None}
    if message is None:
        return record
    try:
        spec = message if isinstance(message, JobSpec) else JobSpec.parse(message)
    except Exception as exc:  # noqa: BLE001 - a bad message fails its task; its record says what it could
        log.debug("job %s: message does not parse (%s); recorded without a summary", job_id, exc)
        return record
    paths = JobPaths.for_spec(spec, settings_of(app))
    return {**record, "spec": spec_summary(spec), "result_uri": paths.result, "metadata_uri": paths.metadata,
            "webhook": spec.webhook.model_dump() if spec.webhook else None}


def spec_summary(spec: JobSpec) -> dict[str, Any]:
    """What a listing shows of a spec: its inputs and the settings that decide its cost."""
    config = spec.style_config()
    return {"content": spec.content, "styles": list(spec.styles), "preset": spec.preset, "size": config.size,
            "iterations": config.iterations, "scales": config.scales, "output_format": spec.output_format,
            "priority": spec.priority}


def _wants(old: dict[str, Any] | None, new: dict[str, Any], event: str) -> bool:
    hook = new.get("webhook")
    if not hook or event not in hook.get("events", ()):
        return False
    return event != "started" or not (old or {}).get("started_at")


def event_data(record: Mapping[str, Any], event: str) -> dict[str, Any]:
    """A delivery's ``data``: the job as the history has it (result URIs once it succeeded)."""
    succeeded = record["status"] == "succeeded"
    data = {k: record.get(k) for k in ("job_id", "status", "submitted_at", "started_at", "ended_at", "worker",
                                        "error")}
    data.update(result_uri=record.get("result_uri") if succeeded else None,
                metadata_uri=record.get("metadata_uri") if succeeded else None)
    if event == "progress":
        data["progress"] = record.get("progress")
    return data


def send_delivery(app: Celery, record: Mapping[str, Any], event: str, now: float) -> None:
    """Queue one delivery (its id kept across retries) for a light worker to POST."""
    delivery = {
        "id": f"msg_{uuid.uuid4().hex}", "job_id": record["job_id"], "event": event,
        "url": record["webhook"]["url"], "first_at": now,
        "payload": {"type": f"job.{event}",
                    "timestamp": datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z"),
                    "data": event_data(record, event)},
    }
    app.send_task(TASK_WEBHOOK, args=(delivery,), priority=app.conf.task_default_priority,
                  retry=True, retry_policy=_SEND_RETRY)


__all__ = ["event_data", "job_event", "new_record", "send_delivery", "spec_summary", "transition"]
