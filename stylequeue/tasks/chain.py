"""A job's chain of thin tasks: take a JobSpec message (small JSON), fetch, call the engine, store.

A job is the chain ``validate -> stylize[0] -> ... -> stylize[n-1] -> publish``; a multi-scale
job has one stylize step per scale, each on the GPU queue: step ``k`` runs the engine's scale
``k``, starting from the previous step's final state in ``checkpoint.pt`` (which the engine
carries up to this scale) or, after a redelivery, from its own checkpoint. Every task (base.py)
bounds its deliveries, retries transient storage errors and honours cancellation; each also
does nothing when ``result.json`` already exists (idempotent job ids).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery.exceptions import Ignore, Reject
from celery.signals import worker_ready, worker_shutting_down

from stylequeue.engine import OptimState, StyleConfig
from stylequeue.engine.images import check_output_pixels, encode_image, fit_longest
from stylequeue.exceptions import OutputTakenError
from stylequeue.job import JobPaths, JobSpec
from stylequeue.tasks import objects
from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_VALIDATE, app
from stylequeue.tasks.base import JobTask, settings
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.lease import Lease, LeaseHeldError, StopPoller, mark_draining, remaining_seconds
from stylequeue.tasks.progress import ProgressReporter
from stylequeue.worker.resources import resources_for
from stylequeue.worker.step import run_step

log = logging.getLogger(__name__)
resources = resources_for(settings)


def _load(message: dict[str, Any]) -> tuple[JobSpec, JobPaths, Any]:
    """The spec (re-validated here, allow-list included: a worker trusts no message), its paths
    and this process's storage."""
    spec = JobSpec.parse(message, settings)
    return spec, JobPaths.for_spec(spec, settings), resources.storage


def _finished(store: Any, paths: JobPaths, spec: JobSpec) -> dict[str, Any] | None:
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


@app.task(bind=True, base=JobTask, name=TASK_VALIDATE)
def validate(self: JobTask, message: dict[str, Any]) -> dict[str, Any]:
    """Light queue: inputs exist, decode and fit the limits before the job takes a GPU."""
    spec, paths, store = _load(message)
    if _finished(store, paths, spec) is not None:
        return {"job_id": spec.job_id, "already_done": True}
    self.check_cancelled(spec.job_id)
    config = spec.style_config()
    sizes = {}
    for uri in [spec.content, *spec.styles]:
        image = objects.read_image(store, uri, settings)
        sizes[uri] = [image.width, image.height]
    # The output has the content's aspect ratio at the job's size: check it before a GPU is taken.
    content_size = tuple(sizes[spec.content])
    check_output_pixels(fit_longest(content_size, config.size), settings.max_pixels)
    config.check_content_size(content_size, spec.content)
    for uri in spec.styles:
        config.check_style_size(tuple(sizes[uri]), uri)
    return {"job_id": spec.job_id, "inputs": sizes, "steps": config.scales}


def starting_state(saved: OptimState | None, config: StyleConfig, step: int,
                   owner: str | None = None) -> tuple[OptimState | None, str]:
    """What step ``step`` continues, and how: ``fresh``, ``resumed`` or ``carried``.

    ``saved`` is the job's checkpoint: this step's own (a redelivery: resume from it), or the
    previous step's final state (the engine carries it up), or nothing (a new job's first step).
    A checkpoint of other settings, or one that names another ``owner``, is never continued.
    """
    if saved is not None and saved.owner != owner:
        log.warning("checkpoint of %s is another job's (or another spec's); not resumed", owner)
        saved = None
    if saved is not None and saved.matches(config):
        if saved.scale_index == step:
            return saved, "resumed"
        if saved.scale_index == step - 1 and saved.scale_finished(config.iterations):
            return saved, "carried"
    if step == 0:
        return None, "fresh"
    raise RuntimeError(
        f"step {step} found no final state of step {step - 1}; the chain's state was lost, resubmit the job"
    )


@app.task(bind=True, base=JobTask, name=TASK_STYLIZE)
def stylize(self: JobTask, message: dict[str, Any], step: int = 0) -> dict[str, Any]:
    """GPU queue: one scale of the optimisation, resumable from the job's checkpoint, under the
    job's lease (tasks/lease.py)."""
    started = time.monotonic()  # a batched step's deadline counts from here, as a time limit would
    started_at = time.time()  # wall clock, for queue latency and per-job overhead (bench/service_bench.py)
    spec, paths, store = _load(message)
    if _finished(store, paths, spec) is not None:
        return {"job_id": spec.job_id, "step": step, "already_done": True}
    self.check_cancelled(spec.job_id)
    control = JobControl(self.app)
    try:
        with Lease(control, spec.job_id, self.request.id, ttl_s=settings.lease_ttl_s,
                   hostname=self.request.hostname or "") as lease:
            return _stylize_step(self, spec, paths, store, step, lease, started, started_at)
    except LeaseHeldError as exc:
        # A second delivery of a step that a live worker runs (Redis restoring a message, a
        # re-send racing a worker that was only slow): do nothing, change no state.
        log.warning("%s; this delivery of step %d does nothing", exc, step)
        raise Ignore() from None


def _stylize_step(task: JobTask, spec: JobSpec, paths: JobPaths, store: Any, step: int, lease: Lease,
                  started: float, started_at: float) -> dict[str, Any]:
    preview_every, checkpoint_every = spec.cadence(settings)
    # Progress cadence and device are the deployment's; they never change the result.
    config = spec.style_config().replace(
        progress_every=settings.progress_every, checkpoint_every=checkpoint_every, device=settings.device)
    model = resources.model(config.pooling, spec.weights)
    if "network" not in spec.params:
        config = config.replace(network=model.network.name)  # the weights' network, unless the job says
    size = config.scale_sizes[step]
    content, content_digest = objects.read_input(store, spec.content, settings)
    styles, style_digests = zip(*(objects.read_input(store, uri, settings) for uri in spec.styles))
    owner = objects.checkpoint_owner(spec.digest(), [content_digest, *style_digests])
    resume, how = starting_state(objects.read_state(store, paths.checkpoint), config, step, owner)
    log.info("job %s step %d/%d at %d px: %s", spec.job_id, step + 1, config.scales, size, how)

    def write(uri: str, data: bytes, content_type: str) -> None:
        """Every write of the step: only while the lease is still ours (fencing)."""
        if not lease.held():
            raise Ignore()  # another worker runs the job now: leave everything to it
        store.put_bytes(uri, data, content_type)

    def save_state(state: OptimState) -> None:
        state.owner = owner
        write(paths.checkpoint, state.to_bytes(), "application/octet-stream")

    reporter = ProgressReporter(
        task, spec.job_id, preview_every=preview_every,
        save_preview=lambda it, img: write(paths.preview(it, time.time()), encode_image(img, "png"), "image/png"),
    )
    end = (step + 1) * config.iterations
    poller = StopPoller(JobControl(task.app), spec.job_id, lease=lease, hostname=task.request.hostname or "",
                        grace_s=settings.shutdown_grace_s, remaining_s=lambda: remaining_seconds(reporter.last, end))
    engine_started_at = time.time()
    result = run_step(
        content, list(styles), config, step=step, model=model, resources=resources, callback=reporter,
        should_stop=poller, resume=resume, on_checkpoint=save_state, started=started,
    )
    engine_finished_at = time.time()
    if result.stopped:
        _stopped(task, spec, poller.reason, lambda: save_state(result.state))
    # The final state is what the next step carries up (and what a redelivery resumes from).
    save_state(result.state)
    metadata = {**result.metadata(), "step": step, "size": size, "started_from": how,
                # The engine counts over the whole job; a step's record counts its own scale.
                "iterations_done": result.state.iteration - step * config.iterations,
                "resumed_from_iteration": resume.iteration if how == "resumed" and resume else None,
                "worker": task.request.hostname,
                "clock": {"started_at": started_at, "engine_started_at": engine_started_at,
                          "engine_finished_at": engine_finished_at}}
    write(paths.step_metadata(step), objects.to_json(metadata), "application/json")
    if step == config.scales - 1:
        write(paths.work_image, encode_image(result.image, "png"), "image/png")
    return {"job_id": spec.job_id, "step": step, "size": size,
            "iterations": result.timings.get("iterations"), "started_from": how}


def _stopped(task: JobTask, spec: JobSpec, reason: str | None, checkpoint: Any) -> None:
    """End a step the engine stopped early: cancelled, lease lost, or handed back while draining."""
    if reason == "draining":
        checkpoint()  # where the next worker resumes
        JobControl(task.app).forget_delivery(task.request.id, task.request.retries or 0)
        log.warning("job %s: worker %s is shutting down; checkpointed and handed back", spec.job_id,
                    task.request.hostname)
        raise Reject("the worker is shutting down: the job goes back to the queue", requeue=True)
    if reason == "lease lost":
        raise Ignore()  # the job runs elsewhere now; this worker writes nothing more
    task.cancel_now(spec.job_id)


@worker_shutting_down.connect
def _drain(sender: Any = None, **_: Any) -> None:
    """SIGTERM (warm shutdown): say so, so this worker's running steps can hand their jobs back."""
    mark_draining(JobControl(app), str(sender), settings.shutdown_grace_s)


@worker_ready.connect
def _serving(sender: Any = None, **_: Any) -> None:
    """A worker (re)started under a hostname that drained before is serving again."""
    hostname = getattr(sender, "hostname", None)
    if hostname:
        JobControl(app).clear_draining(hostname)


@app.task(bind=True, base=JobTask, name=TASK_PUBLISH)
def publish(self: JobTask, message: dict[str, Any]) -> dict[str, Any]:
    """Light queue: the result image, then result.json LAST (its presence marks completion)."""
    spec, paths, store = _load(message)
    done = _finished(store, paths, spec)
    if done is not None:
        return _summary(done)
    self.check_cancelled(spec.job_id)
    steps = spec.style_config().scales
    step_meta = [json.loads(store.get_bytes(paths.step_metadata(k))) for k in range(steps)]
    image = objects.decode_own_image(store.get_bytes(paths.work_image))
    store.put_bytes(paths.result, encode_image(image, paths.result_format), content_type=paths.result_content_type)
    final = step_meta[-1]
    record = {
        "job_id": spec.job_id,
        "status": "succeeded",
        "result_uri": paths.result,
        "metadata_uri": paths.metadata,
        "width": image.width,
        "height": image.height,
        "spec": spec.public_dict(),
        "spec_digest": spec.digest(),
        "weights": final.get("weights"),
        "random_weights": bool(final.get("random_weights")),
        "steps": [_step_record(m) for m in step_meta],
        "engine": {k: final.get(k) for k in ("config", "device", "precision", "versions")},
        # The engine's history runs over every scale: the last step's holds the whole job's.
        "history": final.get("history", []),
        "settings": _relevant_settings(),
        "published_at": time.time(),
    }
    store.put_bytes(paths.metadata, objects.to_json(record, indent=2), "application/json")
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
    """What publish returns (and a producer's ``JobHandle.result()`` reads)."""
    keys = ("job_id", "status", "result_uri", "metadata_uri", "width", "height", "random_weights")
    return {k: record.get(k) for k in keys}


__all__ = ["publish", "starting_state", "stylize", "validate"]
