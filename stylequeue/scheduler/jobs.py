"""Submit one job and follow it: :func:`submit`, :class:`JobHandle`, :func:`get_job`.

```python
from stylequeue.scheduler import submit
job = submit({"job_id": "cat-1", "content": "s3://in/cat.jpg", "styles": ["s3://in/wave.jpg"]})
job.progress()            # {"iteration": 40, "total": 300, "eta_s": 12.5, "losses": {...}} or None
job.wait(timeout=600)     # {"status": "succeeded", "result_uri": ..., "metadata_uri": ...}
job.presigned_url(3600)   # a link to the result image that expires
job.cancel()
```

A job is the chain ``validate -> stylize[0..n-1] -> publish`` with task ids derived from the
job id, so any process can follow a job from its id alone. A job id means one job, as the
idempotency keys of Stripe and Replicate do:

* the same id and the same spec (``JobSpec.digest``: the fields that decide the result) is the
  same job: it runs once, and later submits get its handle (a job that ended without a result,
  FAILED, TIMED_OUT or CANCELLED, runs again);
* the same id and another spec is refused with :class:`JobSpecError` naming the id, unless the
  old job ended without a result and the producer passes ``replace=True``;
* an output prefix belongs to one job: a spec whose ``output`` another job already uses is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from celery import Celery, chain
from celery.canvas import Signature
from celery.exceptions import ChordError, TimeLimitExceeded
from celery.result import AsyncResult

from stylequeue.exceptions import JobFailedError, JobSpecError, JobTimeoutError, StyleQueueError
from stylequeue.job import JobPaths, JobSpec, JobStatus, fit_to_fleet
from stylequeue.settings import Settings
from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_TILES, TASK_VALIDATE, settings_of
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.history import JobHistory
from stylequeue.tasks.lifecycle import job_event
from stylequeue.webhooks import check_url, signing_keys

log = logging.getLogger(__name__)

_RUNNING_STATES = {"STARTED", "PROGRESS", "RETRY"}


def default_app() -> Celery:
    """The app producers use when they pass none (built from the environment on first use)."""
    from stylequeue.tasks.app import app

    return app


def task_ids(job_id: str, steps: int, passes: int = 0) -> list[str]:
    """The chain's task ids in order: validate, stylize.0 .. stylize.<n-1>, a tiled job's planner
    of each pass (tiles.<p>: its tiles get ids when it plans them, tasks/tiles.py), publish."""
    return [f"{job_id}.validate", *(f"{job_id}.stylize.{k}" for k in range(steps)),
            *(f"{job_id}.tiles.{p}" for p in range(passes)), f"{job_id}.publish"]


def parse_spec(spec: JobSpec | Mapping[str, Any] | str | bytes, settings: Settings | None = None) -> JobSpec:
    """Validate a spec (a JobSpec, a mapping, or its JSON text) before anything is queued: fields,
    engine settings and, with ``settings``, that every URI lies under the allowed prefixes and
    that a job too large for one worker is tiled (job.fit_to_fleet)."""
    data = spec.message() if isinstance(spec, JobSpec) else spec
    job = JobSpec.parse(data, settings)
    if settings is None:
        return job
    if job.webhook is not None:
        _check_webhook(job, settings)
    return fit_to_fleet(job, settings)


def _check_webhook(job: JobSpec, settings: Settings) -> None:
    """At submit only (workers re-check at sending): the deployment can sign, and the URL's host
    resolves to addresses it allows."""
    try:
        signing_keys(settings.webhook_secret)
        check_url(job.webhook.url, settings.webhook_allowed, resolve=True)  # type: ignore[union-attr]
    except StyleQueueError as exc:
        raise JobSpecError(f"invalid job spec:\n  webhook: {exc}") from None


def build_chain(app: Celery, spec: JobSpec, ids: list[str]) -> Signature:
    """The job's chain; every signature is immutable: each task gets the spec message itself."""
    message = spec.message()
    # Explicit even for the default: a task sent by name from a producer does not get
    # task_default_priority (only tasks sent from inside a worker do), so it would land at 0.
    priority = spec.priority if spec.priority is not None else app.conf.task_default_priority
    options = {"priority": priority}
    steps, passes = spec.stages()
    names = [TASK_VALIDATE, *([TASK_STYLIZE] * steps), *([TASK_TILES] * passes), TASK_PUBLISH]
    kwargs: list[dict[str, Any]] = [{}, *({"step": k} for k in range(steps)),
                                    *({"tile_pass": p} for p in range(passes)), {}]
    return chain(
        *(
            app.signature(name, args=(message,), kwargs=kw, immutable=True).set(task_id=tid, **options)
            for name, kw, tid in zip(names, kwargs, ids)
        )
    )


@dataclass
class JobHandle:
    """A submitted job: its status, progress, result, and a way to cancel it."""

    job_id: str
    app: Celery = field(repr=False)
    task_ids: list[str]
    result_uri: str
    metadata_uri: str

    @classmethod
    def from_record(cls, app: Celery, job_id: str, record: Mapping[str, Any]) -> "JobHandle":
        return cls(job_id, app, list(record["task_ids"]), record["result_uri"], record["metadata_uri"])

    def _results(self) -> list[AsyncResult]:
        return [AsyncResult(tid, app=self.app) for tid in self.task_ids]

    def tile_ids(self) -> dict[int, list[str]]:
        """A tiled job's tile task ids by pass, as far as its passes have been planned."""
        planned = JobControl(self.app).tiles(self.job_id) if any(".tiles." in t for t in self.task_ids) else {}
        return {int(p): list(rec["task_ids"]) for p, rec in planned.items()}

    def status(self) -> JobStatus:
        """One JobStatus from the states of the chain's tasks (and the cancel flag)."""
        results = self._results()
        states = [r.state for r in results]
        if states[-1] == "SUCCESS":
            return JobStatus.SUCCEEDED
        tiles = [AsyncResult(t, app=self.app) for ids in self.tile_ids().values() for t in ids]
        tile_states = [r.state for r in tiles]
        cancelled = JobControl(self.app).is_cancelled(self.job_id)
        for result, state in zip(results + tiles, states + tile_states):
            if state == "FAILURE" and not (cancelled and _echo_of_revoke(result.result)):
                timed_out = isinstance(result.result, (JobTimeoutError, TimeLimitExceeded))
                return JobStatus.TIMED_OUT if timed_out else JobStatus.FAILED
        running = [i for i, s in enumerate(states) if s in _RUNNING_STATES]
        # REVOKED without our cancel flag is Celery terminating a task whose broker connection
        # was lost: its message goes back to the queue and runs again, so the job is not over.
        # (A tiled pass's planner stays STARTED while its tiles run: the tiles say whether they stopped.)
        if tiles and cancelled and "REVOKED" in tile_states:
            return JobStatus.CANCELLED
        if cancelled and ("REVOKED" in states or not running):
            return JobStatus.CANCELLED  # stopped, or cancelled while queued (dropped on pickup)
        if running:
            first = running[0]
            if first == 0:
                return JobStatus.VALIDATING
            return JobStatus.PUBLISHING if first == len(states) - 1 else JobStatus.RUNNING
        return JobStatus.QUEUED

    def progress(self) -> dict[str, Any] | None:
        """The running step's latest PROGRESS meta (iteration, total, losses, eta_s); during a
        tiled job's tiles, the whole job's count with ``tiles_done`` of ``tiles_total``."""
        tile_ids = self.tile_ids()
        if tile_ids and AsyncResult(self.task_ids[-2], app=self.app).state != "SUCCESS":
            return self._tiles_progress(tile_ids)
        for result in reversed(self._results()[1:-1]):
            if result.state == "PROGRESS" and isinstance(result.info, dict):
                return dict(result.info)
        return None

    def _tiles_progress(self, tile_ids: dict[int, list[str]]) -> dict[str, Any] | None:
        tile_pass = max(tile_ids)
        results = [AsyncResult(t, app=self.app) for t in tile_ids[tile_pass]]
        metas = [r.info for r in results if r.state == "PROGRESS" and isinstance(r.info, dict)]
        done = sum(r.state == "SUCCESS" for r in results)
        if not metas and not done:
            return None
        latest = dict(max(metas, key=lambda m: m.get("updated_at", 0))) if metas else {}
        per_tile = int(latest.get("total") or 0)  # a tile runs the job's iterations once
        steps = len(self.task_ids) - 2 - len([t for t in self.task_ids if ".tiles." in t])
        passes = len([t for t in self.task_ids if ".tiles." in t])
        total_tiles = len(tile_ids[tile_pass])
        iteration = per_tile * (steps + tile_pass * total_tiles + done) + sum(int(m["iteration"]) for m in metas)
        speed = sum(float(m.get("its_per_s") or 0) for m in metas)
        total = per_tile * (steps + passes * total_tiles)
        return {**latest, "job_id": self.job_id, "iteration": iteration, "total": total,
                "tile_pass": tile_pass, "tiles_done": done, "tiles_total": total_tiles,
                "eta_s": (total - iteration) / speed if speed else None}

    def error(self) -> str | None:
        """Why the job failed or was cancelled, in words; None otherwise."""
        for result in self._results():
            if result.state == "FAILURE" and not _echo_of_revoke(result.result):
                exc = result.result
                return f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
            if result.state == "REVOKED":
                return f"job {self.job_id} was cancelled"
        return None

    def result(self) -> dict[str, Any] | None:
        """The publish task's summary (result_uri, metadata_uri, ...) once the job succeeded."""
        publish = self._results()[-1]
        return dict(publish.result) if publish.state == "SUCCESS" else None

    def wait(self, timeout: float | None = None, poll_s: float = 0.25) -> dict[str, Any]:
        """Block until the job ends; its result summary, or :class:`JobFailedError`.

        Polls every task's state rather than ``AsyncResult.get()`` on the last one, which
        would wait forever when an earlier step failed or was cancelled.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status is JobStatus.SUCCEEDED:
                return self.result() or {}
            if status.is_finished:
                message = self.error() or f"job {self.job_id} was cancelled"
                raise JobFailedError(f"job {self.job_id} {status.value}: {message}",
                                     job_id=self.job_id, status=status.value)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {self.job_id} still {status.value} after {timeout} s; wait longer or "
                    "check that a worker consumes its queue (stylequeue worker)"
                )
            time.sleep(poll_s)

    def history(self) -> dict[str, Any] | None:
        """The job's history record (tasks/history.py): status as the workers last wrote it,
        submitted/started/ended times, worker, error, last webhook delivery; None if expired."""
        return JobHistory(self.app).get(self.job_id)

    def presigned_url(self, expires_s: int = 3600) -> str:
        """A link anyone can GET the result image from, for ``expires_s`` seconds (``s3://`` only).

        Share results without sharing credentials; the link stops working when it expires.
        Raises :class:`JobFailedError` while the job has not succeeded.
        """
        from stylequeue.storage import open_storage

        status = self.status()
        if status is not JobStatus.SUCCEEDED:
            raise JobFailedError(f"job {self.job_id} has no result to share yet ({status.value})",
                                 job_id=self.job_id, status=status.value)
        return open_storage(settings_of(self.app)).presign(self.result_uri, expires_s)

    def cancel(self) -> None:
        """Ask the job to stop: a queued task is dropped, a running optimisation stops within
        about half a second; the job ends CANCELLED and publishes nothing."""
        JobControl(self.app).request_cancel(self.job_id)


def _echo_of_revoke(error: Any) -> bool:
    """A tiled pass's chord fails with ChordError when one of its tiles was revoked: after a cancel,
    that is the cancel itself (the tiles stop, so the chord's body never runs), not a failure."""
    return isinstance(error, ChordError) and "TaskRevokedError" in str(error)


def submit(spec: JobSpec | Mapping[str, Any] | str | bytes, *, app: Celery | None = None,
           replace: bool = False) -> JobHandle:
    """Validate ``spec`` (a mapping, a JobSpec or JSON text) and queue its chain; the job's handle.

    Raises :class:`JobSpecError`/:class:`ConfigError` before anything is queued. Submitting an id
    that is queued, running or done with the same spec returns that job's handle and queues
    nothing; with another spec it is refused, unless ``replace`` and the old job ended without a
    result (module docstring).
    """
    app = app or default_app()
    job = parse_spec(spec, settings_of(app))
    handle, new = _claim(app, job, replace=replace)
    if new:
        build_chain(app, job, handle.task_ids).apply_async()
    return handle


def _claim(app: Celery, job: JobSpec, *, replace: bool = False) -> tuple[JobHandle, bool]:
    """Claim the job id (and its output prefix); (handle, True) when this caller must queue the chain."""
    settings: Settings = settings_of(app)
    paths = JobPaths.for_spec(job, settings)
    ids = task_ids(job.job_id, *job.stages())
    record = {"task_ids": ids, "result_uri": paths.result, "metadata_uri": paths.metadata,
              "checkpoint_uri": paths.checkpoint, "spec_digest": job.digest(), "submitted_at": time.time()}
    control = JobControl(app)
    owner = control.claim_output(paths.prefix, job.job_id)
    if owner != job.job_id:
        raise JobSpecError(
            f"output {paths.prefix} belongs to job {owner}; give job {job.job_id} an output of its own "
            "(or leave output out: each job then gets <storage_root>/jobs/<job_id>)"
        )
    if control.claim(job.job_id, record):
        return _claimed(app, job, record), True
    old = control.record(job.job_id) or record
    existing = JobHandle.from_record(app, job.job_id, old)
    status = existing.status()
    # A record from before spec digests were kept counts as the same spec.
    same = old.get("spec_digest", record["spec_digest"]) == record["spec_digest"]
    ended_without_result = status.is_finished and status is not JobStatus.SUCCEEDED
    if same and not ended_without_result:
        return existing, False
    if not same and not (replace and ended_without_result):
        how = "succeeded" if status is JobStatus.SUCCEEDED else status.value
        hint = (" or pass replace=True to run this spec under the id (the old job ended without a result)"
                if ended_without_result else "")
        raise JobSpecError(
            f"job id {job.job_id} was submitted before with another spec (that job is {how}); "
            f"submit this one under a new id{hint}"
        )
    # Run again under the id (the old job failed or was cancelled), from a clean slate: its
    # results forgotten, its checkpoint gone (a new spec must never resume the old one's).
    for result in existing._results():
        result.forget()
    control.release(job.job_id, existing.task_ids, settings.task_max_retries)
    if not same:
        _delete_quietly(app, old.get("checkpoint_uri"))
    if not control.claim(job.job_id, record):
        raise JobSpecError(f"job {job.job_id} was resubmitted by someone else at the same moment")
    return _claimed(app, job, record), True


def _claimed(app: Celery, job: JobSpec, record: dict[str, Any]) -> JobHandle:
    """A job this caller claimed: watched by the recovery sweep until it ends, and a fresh history."""
    JobControl(app).track(job.job_id)
    job_event(app, job, "submitted", submitted_at=record["submitted_at"])
    return JobHandle.from_record(app, job.job_id, record)


def _delete_quietly(app: Celery, uri: str | None) -> None:
    """Remove a replaced job's checkpoint; the stylize task's owner check covers a failure here."""
    if not uri:
        return
    from stylequeue.storage import open_storage

    try:
        open_storage(settings_of(app)).delete(uri)
    except StyleQueueError as exc:
        log.warning("could not delete the replaced job's checkpoint %s (%s); it will not be resumed", uri, exc)


def get_job(job_id: str, *, app: Celery | None = None) -> JobHandle:
    """The handle of a job submitted earlier (by any process), from its id."""
    app = app or default_app()
    record = JobControl(app).record(job_id)
    if record is None:
        raise JobSpecError(
            f"no job with id {job_id!r} is known (never submitted, or its record expired after "
            "result_expires); check the id"
        )
    return JobHandle.from_record(app, job_id, record)
