"""The thin Celery tasks: take a JobSpec message (small JSON), fetch, call the engine, store.

A job is the chain ``validate -> stylize[0] -> ... -> stylize[n-1] -> publish``; a multi-scale
job has one stylize step per scale, each on the GPU queue, carrying the image and Adam's state
through ``checkpoint.pt`` in storage. Every task:

* counts its deliveries and fails a message delivered more than ``max_deliveries`` times
  without running it (a job that kills its worker cannot loop);
* stops at once, as REVOKED ("cancelled"), when the producer has cancelled the job;
* does nothing when ``result.json`` already exists (idempotent job ids);
* retries :class:`TransientStorageError` with backoff and fails every other error at once.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from stylequeue.engine.images import check_output_pixels, fit_longest
from stylequeue.exceptions import (
    JobTimeoutError,
    StyleQueueError,
    TooManyDeliveriesError,
    TransientStorageError,
)
from stylequeue.job import JobPaths, JobSpec
from stylequeue.tasks import runtime
from stylequeue.tasks.app import (
    TASK_CONTACT_SHEET,
    TASK_EXPIRE_PREVIEWS,
    TASK_PUBLISH,
    TASK_RECOVER,
    TASK_SCAN_MANIFESTS,
    TASK_STYLIZE,
    TASK_VALIDATE,
    app,
    settings_of,
)
from stylequeue.tasks.control import CancelPoller, JobControl
from stylequeue.tasks.progress import ProgressReporter
from stylequeue.worker.batching import run_stylize

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


def _load(message: dict[str, Any]) -> tuple[JobSpec, JobPaths, Any]:
    """The spec (re-validated here, allow-list included: a worker trusts no message), its paths
    and this process's storage."""
    spec = JobSpec.parse(message, settings)
    return spec, JobPaths.for_spec(spec, settings), runtime.storage_for(settings)


def _finished(store: Any, paths: JobPaths) -> dict[str, Any] | None:
    """The published result.json when the job already completed (idempotent job ids)."""
    if not store.exists(paths.metadata):
        return None
    return json.loads(store.get_bytes(paths.metadata))


@app.task(bind=True, base=JobTask, name=TASK_VALIDATE)
def validate(self: JobTask, message: dict[str, Any]) -> dict[str, Any]:
    """Light queue: inputs exist, decode and fit the limits before the job takes a GPU."""
    spec, paths, store = _load(message)
    if _finished(store, paths) is not None:
        return {"job_id": spec.job_id, "already_done": True}
    self.check_cancelled(spec.job_id)
    config = spec.style_config()
    sizes = {}
    for uri in [spec.content, *spec.styles]:
        image = runtime.read_image(store, uri, settings)
        sizes[uri] = [image.width, image.height]
    # The output has the content's aspect ratio at the job's size: check it before a GPU is taken.
    check_output_pixels(fit_longest(tuple(sizes[spec.content]), config.size), settings.max_pixels)
    runtime.check_step_sizes(spec.content, tuple(sizes[spec.content]), config)
    return {"job_id": spec.job_id, "inputs": sizes, "steps": len(runtime.step_sizes(config))}


@app.task(bind=True, base=JobTask, name=TASK_STYLIZE)
def stylize(self: JobTask, message: dict[str, Any], step: int = 0) -> dict[str, Any]:
    """GPU queue: one scale of the optimisation, resumable from the job's checkpoint."""
    started = time.monotonic()  # a batched step's deadline counts from here, as a time limit would
    started_at = time.time()  # wall clock, for queue latency and per-job overhead (bench/service_bench.py)
    spec, paths, store = _load(message)
    if _finished(store, paths) is not None:
        return {"job_id": spec.job_id, "step": step, "already_done": True}
    self.check_cancelled(spec.job_id)
    job_config = spec.style_config()
    steps = len(runtime.step_sizes(job_config))
    preview_every, checkpoint_every = spec.cadence(settings)
    config = runtime.step_config(job_config, step, settings, checkpoint_every)
    content = runtime.read_image(store, spec.content, settings)
    styles = [runtime.read_image(store, uri, settings) for uri in spec.styles]
    resume, how = runtime.starting_state(runtime.read_state(store, paths.checkpoint), config, step, content)
    log.info("job %s step %d/%d at %d px: %s", spec.job_id, step + 1, steps, config.size, how)

    poller = CancelPoller(JobControl(self.app), spec.job_id)
    reporter = ProgressReporter(
        self, spec.job_id, preview_every=preview_every,
        save_preview=lambda it, img: store.put_bytes(
            paths.preview(step * config.iterations + it, time.time()),
            runtime.image_bytes(img), content_type="image/png"),
        scale_offset=step, num_scales=steps, iteration_offset=step * config.iterations,
        total=steps * config.iterations,
    )
    engine_started_at = time.time()
    result = run_stylize(
        content, styles, config, model=runtime.model_for(settings, config.pooling, spec.weights),
        settings=settings, store=store, callback=reporter, should_stop=poller, resume=resume,
        on_checkpoint=lambda state: runtime.write_state(store, paths.checkpoint, state), started=started,
    )
    engine_finished_at = time.time()
    if result.stopped:
        self.cancel_now(spec.job_id)
    # The final state is what the next step carries up (and what a redelivery resumes from).
    runtime.write_state(store, paths.checkpoint, result.state)
    metadata = {**result.metadata(), "step": step, "size": config.size, "started_from": how,
                "resumed_from_iteration": resume.iteration if how == "resumed" and resume else None,
                "worker": self.request.hostname,
                "clock": {"started_at": started_at, "engine_started_at": engine_started_at,
                          "engine_finished_at": engine_finished_at}}
    store.put_bytes(paths.step_metadata(step), json.dumps(metadata).encode(), "application/json")
    if step == steps - 1:
        store.put_bytes(paths.work_image, runtime.image_bytes(result.image), "image/png")
    return {"job_id": spec.job_id, "step": step, "size": config.size,
            "iterations": result.timings.get("iterations"), "started_from": how}


@app.task(bind=True, base=JobTask, name=TASK_PUBLISH)
def publish(self: JobTask, message: dict[str, Any]) -> dict[str, Any]:
    """Light queue: the result image, then result.json LAST (its presence marks completion)."""
    spec, paths, store = _load(message)
    done = _finished(store, paths)
    if done is not None:
        return _summary(done)
    self.check_cancelled(spec.job_id)
    steps = len(runtime.step_sizes(spec.style_config()))
    step_meta = [json.loads(store.get_bytes(paths.step_metadata(k))) for k in range(steps)]
    image = runtime.decode_preview(store.get_bytes(paths.work_image))
    store.put_bytes(paths.result, runtime.image_bytes(image, paths.result_format),
                    content_type=paths.result_content_type)
    final = step_meta[-1]
    record = {
        "job_id": spec.job_id,
        "status": "succeeded",
        "result_uri": paths.result,
        "metadata_uri": paths.metadata,
        "width": image.width,
        "height": image.height,
        "spec": spec.public_dict(),
        "weights": final.get("weights"),
        "random_weights": bool(final.get("random_weights")),
        "steps": [_step_record(m) for m in step_meta],
        "engine": {k: final.get(k) for k in ("config", "device", "precision", "versions")},
        "history": [h for m in step_meta for h in m.get("history", [])],
        "settings": _relevant_settings(),
        "published_at": time.time(),
    }
    store.put_bytes(paths.metadata, json.dumps(record, indent=2).encode(), "application/json")
    for uri in (paths.checkpoint, paths.work_image, *(paths.step_metadata(k) for k in range(steps))):
        store.delete(uri)
    JobControl(self.app).untrack(spec.job_id)  # nothing left for recovery to watch
    return _summary(record)


def _step_record(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in ("step", "size", "width", "height", "iterations_done", "started_from",
                                     "resumed_from_iteration", "batch_size", "worker", "timings", "clock")}


def _relevant_settings() -> dict[str, Any]:
    """The deployment settings that shaped the result (no credentials: see Settings.redacted)."""
    redacted = settings.redacted()
    keys = ("weights", "weights_sha256", "device", "max_pixels", "progress_every",
            "preview_every", "checkpoint_every", "job_time_limit")
    return {k: redacted[k] for k in keys}


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("job_id", "status", "result_uri", "metadata_uri", "width", "height", "random_weights")
    return {k: record.get(k) for k in keys}


@app.task(bind=True, base=JobTask, name=TASK_CONTACT_SHEET)
def contact_sheet(self: JobTask, results: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    """Chord body: a grid of a batch's results, stored under the batch prefix."""
    from stylequeue.scheduler.contact_sheet import make_contact_sheet

    store = runtime.storage_for(settings)
    images, labels = [], []
    for result in results:
        images.append(runtime.decode_preview(store.get_bytes(result["result_uri"])))
        labels.append(result["job_id"].rsplit("-", 1)[-1])
    sheet = make_contact_sheet(images, tile=batch.get("tile", 128), labels=labels)
    uri = batch["sheet_uri"]
    store.put_bytes(uri, runtime.image_bytes(sheet), content_type="image/png")
    return {"batch_id": batch["batch_id"], "sheet_uri": uri, "width": sheet.width,
            "height": sheet.height, "jobs": [r["job_id"] for r in results]}


@app.task(bind=True, base=JobTask, name=TASK_SCAN_MANIFESTS)
def scan_manifests(self: JobTask) -> dict[str, Any]:
    """Beat: submit manifests dropped under <storage_root>/manifests/incoming/."""
    from stylequeue.scheduler.manifest import scan_incoming

    return scan_incoming(self.app, runtime.storage_for(settings))


_PREVIEW_TIME = re.compile(r"-t(\d+)\.png$")


@app.task(bind=True, base=JobTask, name=TASK_EXPIRE_PREVIEWS)
def expire_previews(self: JobTask) -> dict[str, Any]:
    """Beat: delete previews older than ``preview_retention_days`` (their names carry the time)."""
    if settings.preview_retention_days <= 0:
        return {"deleted": 0}
    store = runtime.storage_for(settings)
    cutoff = time.time() - settings.preview_retention_days * 86400
    deleted = 0
    for uri in store.list(f"{settings.resolved_storage_root}/jobs/"):
        match = _PREVIEW_TIME.search(uri)
        if "/previews/" in uri and match and int(match.group(1)) < cutoff:
            store.delete(uri)
            deleted += 1
    return {"deleted": deleted}


@app.task(bind=True, base=JobTask, name=TASK_RECOVER)
def recover(self: JobTask) -> dict[str, Any]:
    """Beat: re-send job messages the broker lost (:mod:`stylequeue.tasks.recovery`)."""
    from stylequeue.tasks.recovery import recover as sweep

    return sweep(self.app)


__all__ = ["validate", "stylize", "publish", "contact_sheet", "scan_manifests", "expire_previews", "recover"]
