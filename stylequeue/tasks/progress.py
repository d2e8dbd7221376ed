"""Turn the engine's progress callback into Celery states, Flower events and preview images.

The engine calls back with a ``Progress`` dataclass and knows nothing of Celery; this is the
one place that translates it: a ``PROGRESS`` state for ``AsyncResult.info`` (what
``JobHandle.progress()`` reads), a custom ``task-progress`` event for Flower's event stream, and
now and then a preview image under the job's output prefix.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from stylequeue.engine.result import Progress

log = logging.getLogger(__name__)

PROGRESS_STATE = "PROGRESS"
PROGRESS_EVENT = "task-progress"


class _Task(Protocol):
    def update_state(self, task_id: str | None = None, state: str | None = None, meta: Any = None) -> None: ...
    def send_event(self, type_: str, retry: bool = True, retry_policy: Any = None, **fields: Any) -> None: ...


def _number(value: Any) -> float | None:
    """Losses as plain floats; NaN and inf become None so the JSON stays valid."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def progress_meta(progress: "Progress", job_id: str) -> dict[str, Any]:
    """The JSON-able dict stored as the PROGRESS state's meta and sent as the event's fields.

    The engine counts iterations and scales over the whole job, also when a chain step runs one
    of its scales, so its Progress is the job's progress as it is.
    """
    return {
        "job_id": job_id,
        "iteration": int(progress.iteration),
        "total": int(progress.total),
        "scale": int(progress.scale_index),
        "num_scales": int(progress.num_scales),
        "width": int(progress.width),
        "height": int(progress.height),
        "losses": {
            "total": _number(progress.loss),
            "content": _number(progress.content_loss),
            "style": _number(progress.style_loss),
            "tv": _number(progress.tv_loss),
        },
        "elapsed_s": _number(progress.elapsed_s),
        "its_per_s": _number(progress.its_per_s),
        "eta_s": _number(progress.eta_s),
        "updated_at": time.time(),
    }


class ProgressReporter:
    """The ``callback`` a stylize task hands to the engine.

    ``save_preview(iteration, image)`` stores a preview each time the iteration passes a multiple
    of ``preview_every`` after the task's first report (the engine calls back every ``progress_every`` iterations, which need
    not divide ``preview_every``). A failing preview upload is logged, never fatal: previews are a
    courtesy, the job is the result.
    """

    def __init__(
        self,
        task: _Task,
        job_id: str,
        *,
        preview_every: int,
        save_preview: Callable[[int, Any], None] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        event_every_s: float = 0.0,
    ) -> None:
        self.task = task
        self.job_id = job_id
        self.preview_every = preview_every
        self.save_preview = save_preview
        # The job's progress lifecycle event (history, webhook): at most one every event_every_s,
        # however often the engine reports, so a receiver is not flooded.
        self.on_event = on_event
        self.event_every_s = event_every_s
        self._last_event: float | None = None  # monotonic time of the last one
        self._last_preview: int | None = None  # the iteration of the last preview
        self.last: "Progress | None" = None  # the latest report (how long the step still needs)

    def __call__(self, progress: "Progress") -> None:
        self.last = progress
        meta = progress_meta(progress, self.job_id)
        self.task.update_state(state=PROGRESS_STATE, meta=meta)
        try:
            self.task.send_event(PROGRESS_EVENT, retry=False, **meta)
        except Exception as exc:  # noqa: BLE001 - an event is best-effort; the state is the record
            log.debug("could not send %s for %s: %s", PROGRESS_EVENT, self.job_id, exc)
        now = time.monotonic()
        if self.on_event is not None and (self._last_event is None or now - self._last_event >= self.event_every_s):
            self._last_event = now
            self.on_event(meta)  # job_event never raises
        self._maybe_preview(progress)

    def _maybe_preview(self, progress: "Progress") -> None:
        if self.save_preview is None or self.preview_every <= 0:
            return
        iteration = int(progress.iteration)
        if self._last_preview is None:
            # A task may start mid-job (a chain step, a resumed job): count from its start.
            self._last_preview = iteration - iteration % self.preview_every
        if iteration // self.preview_every <= self._last_preview // self.preview_every:
            return
        self._last_preview = iteration
        try:
            self.save_preview(iteration, progress.preview())
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("preview at iteration %d of %s not stored: %s", iteration, self.job_id, exc)
