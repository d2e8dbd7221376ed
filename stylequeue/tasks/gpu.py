"""What every GPU task of a job does around the engine, written once for stylize steps and tiles:
the job's settings as this worker runs them, its inputs and their owner digest, the task's lease,
writes fenced by it, progress, and how an early stop ends (cancelled, lease lost, handed back).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from celery.exceptions import Ignore, Reject
from PIL import Image

from stylequeue.engine import OptimState, StyleConfig, VGGFeatures
from stylequeue.engine.images import encode_image
from stylequeue.job import JobPaths, JobSpec
from stylequeue.settings import Settings
from stylequeue.tasks import objects
from stylequeue.tasks.base import JobTask
from stylequeue.tasks.control import JobControl
from stylequeue.tasks.lease import Lease, LeaseHeldError, StopPoller, remaining_seconds
from stylequeue.tasks.lifecycle import job_event
from stylequeue.tasks.progress import ProgressReporter
from stylequeue.worker.resources import Resources

log = logging.getLogger(__name__)


@dataclass
class GpuRun:
    """One GPU task's view of its job, under its lease."""

    task: JobTask
    spec: JobSpec
    paths: JobPaths
    store: Any
    settings: Settings
    config: StyleConfig  # the job's, with this deployment's cadence and device, the weights' network
    model: VGGFeatures
    content: Image.Image
    styles: list[Image.Image]
    owner: str  # whose checkpoints: the spec's digest and the inputs' bytes
    lease: Lease

    def write(self, uri: str, data: bytes, content_type: str) -> None:
        """Every write of the task: only while the lease is still ours (fencing)."""
        if not self.lease.held():
            raise Ignore()  # another worker runs it now: leave everything to it
        self.store.put_bytes(uri, data, content_type)

    def save_state(self, uri: str, state: OptimState) -> None:
        state.owner = self.owner
        self.write(uri, state.to_bytes(), "application/octet-stream")

    def save_image(self, uri: str, image: Image.Image) -> None:
        self.write(uri, encode_image(image, "png"), "image/png")

    def reporter(self, preview_every: int, *, job_progress: bool = True) -> ProgressReporter:
        """The engine's callback: PROGRESS state, task-progress event, fenced previews, and (when
        this task's count is the job's, ``job_progress``) the job's progress lifecycle event."""
        return ProgressReporter(self.task, self.spec.job_id, preview_every=preview_every,
                                save_preview=lambda it, img: self.save_image(self.paths.preview(it, time.time()), img),
                                on_event=self.progress_event if job_progress else None,
                                event_every_s=self.settings.webhook_progress_every_s)

    def progress_event(self, meta: dict[str, Any]) -> None:
        job_event(self.task.app, self.spec, "progress", progress=meta)

    def poller(self, reporter: ProgressReporter, end_iteration: int) -> StopPoller:
        """The engine's should_stop: cancelled, lease lost, or draining with too little grace."""
        return StopPoller(JobControl(self.task.app), self.spec.job_id, lease=self.lease,
                          hostname=self.task.request.hostname or "", grace_s=self.settings.shutdown_grace_s,
                          remaining_s=lambda: remaining_seconds(reporter.last, end_iteration))

    def stopped(self, reason: str | None, checkpoint: Callable[[], None]) -> None:
        """End a run the engine stopped early: cancelled, lease lost, or handed back while draining."""
        task = self.task
        if reason == "draining":
            checkpoint()  # where the next worker resumes
            JobControl(task.app).forget_delivery(task.request.id, task.request.retries or 0)
            log.warning("job %s: worker %s is shutting down; checkpointed and handed back", self.spec.job_id,
                        task.request.hostname)
            raise Reject("the worker is shutting down: the job goes back to the queue", requeue=True)
        if reason == "lease lost":
            raise Ignore()  # the job runs elsewhere now; this worker writes nothing more
        task.cancel_now(self.spec.job_id)


@contextmanager
def gpu_run(task: JobTask, spec: JobSpec, paths: JobPaths, store: Any, resources: Resources) -> Iterator[GpuRun]:
    """Take the task's lease and gather the job's settings, model and inputs for one GPU task.

    A delivery that finds the lease held by a live worker (Redis restoring a message, a re-send
    racing a worker that was only slow) does nothing and changes no state.
    """
    settings = resources.settings
    _, checkpoint_every = spec.cadence(settings)
    # Progress cadence and device are the deployment's; they never change the result.
    config = spec.style_config().replace(
        progress_every=settings.progress_every, checkpoint_every=checkpoint_every, device=settings.device)
    try:
        with Lease(JobControl(task.app), spec.job_id, task.request.id, ttl_s=settings.lease_ttl_s,
                   hostname=task.request.hostname or "") as lease:
            job_event(task.app, spec, "started", worker=task.request.hostname)
            model = resources.model(config.pooling, spec.weights)
            if "network" not in spec.params:
                config = config.replace(network=model.network.name)  # the weights', unless the job says
            content, content_digest = objects.read_input(store, spec.content, settings)
            styles, style_digests = zip(*(objects.read_input(store, uri, settings) for uri in spec.styles))
            owner = objects.checkpoint_owner(spec.digest(), [content_digest, *style_digests])
            yield GpuRun(task, spec, paths, store, settings, config, model, content, list(styles), owner, lease)
    except LeaseHeldError as exc:
        log.warning("%s; this delivery does nothing", exc)
        raise Ignore() from None
