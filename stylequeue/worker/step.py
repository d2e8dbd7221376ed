"""Run one stylize step in this process: alone, or in a batch with other jobs on the GPU thread.

With ``batch_max`` 1 (the default) a task runs the engine itself, with this process's style-target
cache. With ``batch_max`` N > 1 the worker runs a threads pool of N task threads
(``stylequeue worker --batch N``); each task hands its step to the process's :class:`Batcher`,
whose GPU thread runs compatible steps together with :func:`stylequeue.engine.stylize_many`.

Each job keeps Celery's semantics: its task thread receives its own result or exception; its
progress callback and checkpoint uploads run in that thread (posted through its Mailbox); its
cancel flag is polled there and read by the GPU thread as an Event; and a per-job deadline
(``job_soft_time_limit``) stops it, because the threads pool enforces no Celery time limit.
No Celery import here: the task passes plain callables.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

from PIL import Image

from stylequeue.engine import OptimState, Progress, StyleConfig, StyleResult, VGGFeatures, stylize
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.transfer import BatchItem, start_scale, stylize_many
from stylequeue.exceptions import JobTimeoutError
from stylequeue.worker.batcher import Mailbox

if TYPE_CHECKING:
    from stylequeue.worker.resources import Resources

_alone = itertools.count()  # keys of jobs that never share a batch


@dataclass
class GpuJob:
    """One stylize step waiting for the GPU thread; callables run in the task's own thread."""

    content: Image.Image
    styles: Sequence[Image.Image]
    config: StyleConfig
    model: VGGFeatures
    deadline: float  # time.monotonic() at which the job stops and fails as timed out
    last_scale: int  # the scale this step ends with (the service runs one scale per task)
    resume: OptimState | None = None
    init_image: Image.Image | None = None
    callback: Callable[[Progress], None] | None = None
    on_checkpoint: Callable[[OptimState], None] | None = None
    mailbox: Mailbox = field(default_factory=Mailbox)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        """Polled by the GPU thread every iteration: Events and the clock only, no I/O."""
        return self.cancelled.is_set() or self.mailbox.failed.is_set() or time.monotonic() > self.deadline

    def item(self) -> BatchItem:
        box, callback, checkpoint = self.mailbox, self.callback, self.on_checkpoint
        return BatchItem(
            content=self.content, styles=self.styles, init_image=self.init_image, config=self.config,
            callback=(lambda p: box.post(lambda: callback(p))) if callback is not None else None,
            should_stop=self.should_stop, resume=self.resume,
            on_checkpoint=(lambda s: box.post(lambda: checkpoint(s))) if checkpoint is not None else None,
        )


def compatibility_key(job: GpuJob) -> Hashable:
    """Jobs with equal keys may share a batch.

    Same model (weights, pooling, device), same settings except BATCH_FREE (seed, init, blend
    weights, EMA, cadence), the same optimised size at every scale, and the same first and last
    scale. L-BFGS never batches (it is not separable), so each L-BFGS job gets a key of its own.
    """
    if job.config.optimizer != "adam":
        return ("alone", next(_alone))
    signature = json.dumps(job.config.batch_signature(), sort_keys=True)
    start = start_scale(job.resume, job.config, job.last_scale)
    return (id(job.model), signature, job.config.output_sizes(job.content.size), start, job.last_scale)


def run_jobs(jobs: list[GpuJob], *, max_batch: int, target_cache: TargetCache | None) -> list[StyleResult]:
    """The Batcher's runner (GPU thread): one stylize_many over compatible jobs."""
    return stylize_many([job.item() for job in jobs], jobs[0].config, model=jobs[0].model,
                        max_batch=max_batch, target_cache=target_cache, last_scale=jobs[0].last_scale)


def run_step(
    content: Image.Image,
    styles: Sequence[Image.Image],
    config: StyleConfig,
    *,
    step: int,
    model: VGGFeatures,
    resources: "Resources",
    callback: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: OptimState | None = None,
    on_checkpoint: Callable[[OptimState], None] | None = None,
    started: float | None = None,
) -> StyleResult:
    """Scale ``step`` of a job, alone or in a batch as the settings say; arguments as engine.stylize.

    ``should_stop`` (the task's cancel poller) is called in this thread only. In batched mode the
    step stops at ``started + job_soft_time_limit`` and raises JobTimeoutError.
    """
    settings = resources.settings
    cache = resources.target_cache()
    if settings.batch_max <= 1:
        return stylize(content, styles, config, model=model, callback=callback, should_stop=should_stop,
                       resume=resume, on_checkpoint=on_checkpoint, target_cache=cache, last_scale=step)
    begun = time.monotonic() if started is None else started
    job = GpuJob(content=content, styles=styles, config=config, model=model,
                 deadline=begun + settings.job_soft_time_limit, last_scale=step, resume=resume,
                 callback=callback, on_checkpoint=on_checkpoint)

    def tick() -> None:
        if should_stop is not None and should_stop():
            job.cancelled.set()

    result = resources.batcher().submit(job, compatibility_key(job), job.mailbox, tick=tick)
    if result.stopped and not job.cancelled.is_set() and time.monotonic() > job.deadline:
        raise JobTimeoutError(
            f"the job ran past its time limit of {settings.job_soft_time_limit} s; lower the size or "
            "iterations, or raise STYLEQUEUE_JOB_SOFT_TIME_LIMIT"
        )
    return result
