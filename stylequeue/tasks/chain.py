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

from celery.signals import worker_ready, worker_shutting_down

from stylequeue.engine import OptimState, StyleConfig
from stylequeue.engine.images import check_output_pixels, encode_image, fit_longest
from stylequeue.job import JobPaths, JobSpec
from stylequeue.tasks import objects
from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_VALIDATE, app
from stylequeue.tasks.base import JobTask, finished_record, load_job, resources, settings
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.gpu import GpuRun, gpu_run
from stylequeue.tasks.lease import mark_draining
from stylequeue.tasks.lifecycle import job_event
from stylequeue.tasks.tiles import tile_records
from stylequeue.worker.step import run_step

log = logging.getLogger(__name__)


@app.task(bind=True, base=JobTask, name=TASK_VALIDATE)
def validate(self: JobTask, message: dict[str, Any]) -> dict[str, Any]:
    """Light queue: inputs exist, decode and fit the limits before the job takes a GPU."""
    spec, paths, store = load_job(message)
    if finished_record(store, paths, spec) is not None:
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
    steps, passes = spec.stages()
    return {"job_id": spec.job_id, "inputs": sizes, "steps": steps, "tile_passes": passes}


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
    task's lease (tasks/lease.py)."""
    started = time.monotonic()  # a batched step's deadline counts from here, as a time limit would
    started_at = time.time()  # wall clock, for queue latency and per-job overhead (bench/service_bench.py)
    spec, paths, store = load_job(message)
    if finished_record(store, paths, spec) is not None:
        return {"job_id": spec.job_id, "step": step, "already_done": True}
    self.check_cancelled(spec.job_id)
    with gpu_run(self, spec, paths, store, resources) as run:
        return _stylize_step(run, step, started, started_at)


def _stylize_step(run: GpuRun, step: int, started: float, started_at: float) -> dict[str, Any]:
    config, paths, spec = run.config, run.paths, run.spec
    size = config.scale_sizes[step]
    resume, how = starting_state(objects.read_state(run.store, paths.checkpoint), config, step, run.owner)
    log.info("job %s step %d/%d at %d px: %s", spec.job_id, step + 1, config.scales, size, how)
    reporter = run.reporter(spec.cadence(settings)[0])
    poller = run.poller(reporter, (step + 1) * config.iterations)
    engine_started_at = time.time()
    result = run_step(
        run.content, run.styles, config, step=step, model=run.model, resources=resources, callback=reporter,
        should_stop=poller, resume=resume, on_checkpoint=lambda state: run.save_state(paths.checkpoint, state),
        started=started,
    )
    engine_finished_at = time.time()
    if result.stopped:
        run.stopped(poller.reason, lambda: run.save_state(paths.checkpoint, result.state))
    # The final state is what the next step carries up (and what a redelivery resumes from).
    run.save_state(paths.checkpoint, result.state)
    metadata = {**result.metadata(), "step": step, "size": size, "started_from": how,
                # The engine counts over the whole job; a step's record counts its own scale.
                "iterations_done": result.state.iteration - step * config.iterations,
                "resumed_from_iteration": resume.iteration if how == "resumed" and resume else None,
                "worker": run.task.request.hostname,
                "clock": {"started_at": started_at, "engine_started_at": engine_started_at,
                          "engine_finished_at": engine_finished_at}}
    run.write(paths.step_metadata(step), objects.to_json(metadata), "application/json")
    if step == spec.stages()[0] - 1:
        # The last step's picture: the result, or where a tiled job's tiles start.
        run.save_image(paths.work_image, result.image)
    return {"job_id": spec.job_id, "step": step, "size": size,
            "iterations": result.timings.get("iterations"), "started_from": how}


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
    spec, paths, store = load_job(message)
    done = finished_record(store, paths, spec)
    if done is not None:
        # Published before (a redelivery): the event again, in case the first delivery died
        # before sending it; the history takes it once.
        job_event(self.app, spec, "succeeded")
        return _summary(done)
    self.check_cancelled(spec.job_id)
    steps, passes = spec.stages()
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
        "tiles": tile_records(store, spec, paths, JobControl(self.app)) if passes else None,
        "engine": {k: final.get(k) for k in ("config", "device", "precision", "versions")},
        # The engine's history runs over every scale: the last step's holds the whole job's.
        "history": final.get("history", []),
        "settings": _relevant_settings(),
        "published_at": time.time(),
    }
    store.put_bytes(paths.metadata, objects.to_json(record, indent=2), "application/json")
    for uri in (paths.checkpoint, *store.list(paths.work)):
        store.delete(uri)
    JobControl(self.app).untrack(spec.job_id)  # nothing left for recovery to watch
    job_event(self.app, spec, "succeeded")
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
