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

from stylequeue.engine import OptimState, StyleConfig
from stylequeue.engine.images import check_output_pixels, encode_image, fit_longest
from stylequeue.job import JobPaths, JobSpec
from stylequeue.tasks import objects
from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_VALIDATE, app
from stylequeue.tasks.base import JobTask, settings
from stylequeue.tasks.control import CancelPoller, JobControl
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
        image = objects.read_image(store, uri, settings)
        sizes[uri] = [image.width, image.height]
    # The output has the content's aspect ratio at the job's size: check it before a GPU is taken.
    content_size = tuple(sizes[spec.content])
    check_output_pixels(fit_longest(content_size, config.size), settings.max_pixels)
    config.check_content_size(content_size, spec.content)
    return {"job_id": spec.job_id, "inputs": sizes, "steps": config.scales}


def starting_state(saved: OptimState | None, config: StyleConfig, step: int) -> tuple[OptimState | None, str]:
    """What step ``step`` continues, and how: ``fresh``, ``resumed`` or ``carried``.

    ``saved`` is the job's checkpoint: this step's own (a redelivery: resume from it), or the
    previous step's final state (the engine carries it up), or nothing (a new job's first step).
    """
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
    """GPU queue: one scale of the optimisation, resumable from the job's checkpoint."""
    started = time.monotonic()  # a batched step's deadline counts from here, as a time limit would
    started_at = time.time()  # wall clock, for queue latency and per-job overhead (bench/service_bench.py)
    spec, paths, store = _load(message)
    if _finished(store, paths) is not None:
        return {"job_id": spec.job_id, "step": step, "already_done": True}
    self.check_cancelled(spec.job_id)
    preview_every, checkpoint_every = spec.cadence(settings)
    # Progress cadence and device are the deployment's; they never change the result.
    config = spec.style_config().replace(
        progress_every=settings.progress_every, checkpoint_every=checkpoint_every, device=settings.device)
    model = resources.model(config.pooling, spec.weights)
    if "network" not in spec.params:
        config = config.replace(network=model.network.name)  # the weights' network, unless the job says
    size = config.scale_sizes[step]
    content = objects.read_image(store, spec.content, settings)
    styles = [objects.read_image(store, uri, settings) for uri in spec.styles]
    resume, how = starting_state(objects.read_state(store, paths.checkpoint), config, step)
    log.info("job %s step %d/%d at %d px: %s", spec.job_id, step + 1, config.scales, size, how)

    reporter = ProgressReporter(
        self, spec.job_id, preview_every=preview_every,
        save_preview=lambda it, img: store.put_bytes(
            paths.preview(it, time.time()), encode_image(img, "png"), content_type="image/png"),
    )
    engine_started_at = time.time()
    result = run_step(
        content, styles, config, step=step, model=model,
        resources=resources, callback=reporter, should_stop=CancelPoller(JobControl(self.app), spec.job_id),
        resume=resume, on_checkpoint=lambda state: objects.write_state(store, paths.checkpoint, state),
        started=started,
    )
    engine_finished_at = time.time()
    if result.stopped:
        self.cancel_now(spec.job_id)
    # The final state is what the next step carries up (and what a redelivery resumes from).
    objects.write_state(store, paths.checkpoint, result.state)
    metadata = {**result.metadata(), "step": step, "size": size, "started_from": how,
                # The engine counts over the whole job; a step's record counts its own scale.
                "iterations_done": result.state.iteration - step * config.iterations,
                "resumed_from_iteration": resume.iteration if how == "resumed" and resume else None,
                "worker": self.request.hostname,
                "clock": {"started_at": started_at, "engine_started_at": engine_started_at,
                          "engine_finished_at": engine_finished_at}}
    store.put_bytes(paths.step_metadata(step), json.dumps(metadata).encode(), "application/json")
    if step == config.scales - 1:
        store.put_bytes(paths.work_image, encode_image(result.image, "png"), "image/png")
    return {"job_id": spec.job_id, "step": step, "size": size,
            "iterations": result.timings.get("iterations"), "started_from": how}


@app.task(bind=True, base=JobTask, name=TASK_PUBLISH)
def publish(self: JobTask, message: dict[str, Any]) -> dict[str, Any]:
    """Light queue: the result image, then result.json LAST (its presence marks completion)."""
    spec, paths, store = _load(message)
    done = _finished(store, paths)
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
        "weights": final.get("weights"),
        "random_weights": bool(final.get("random_weights")),
        "steps": [_step_record(m) for m in step_meta],
        "engine": {k: final.get(k) for k in ("config", "device", "precision", "versions")},
        # The engine's history runs over every scale: the last step's holds the whole job's.
        "history": final.get("history", []),
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
    """What publish returns (and a producer's ``JobHandle.result()`` reads)."""
    keys = ("job_id", "status", "result_uri", "metadata_uri", "width", "height", "random_weights")
    return {k: record.get(k) for k in keys}


__all__ = ["publish", "starting_state", "stylize", "validate"]
