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
from typing import Any, Callable, Protocol

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


def progress_meta(
    progress: Any,
    job_id: str,
    *,
    scale_offset: int = 0,
    num_scales: int | None = None,
    iteration_offset: int = 0,
    total: int | None = None,
) -> dict[str, Any]:
    """The JSON-able dict stored as the PROGRESS state's meta and sent as the event's fields.

    The offsets place a single-scale chain step within the whole multi-scale job (step k of a
    chain runs the engine with one scale, counting its own iterations from 0).
    """
    scale_index = int(getattr(progress, "scale_index", 0)) + scale_offset
    return {
        "job_id": job_id,
        "iteration": int(progress.iteration) + iteration_offset,
        "total": int(total if total is not None else progress.total),
        "scale": scale_index,
        "num_scales": int(num_scales or getattr(progress, "num_scales", 1)),
        "width": int(getattr(progress, "width", 0)),
        "height": int(getattr(progress, "height", 0)),
        "losses": {
            "total": _number(getattr(progress, "loss", None)),
            "content": _number(getattr(progress, "content_loss", None)),
            "style": _number(getattr(progress, "style_loss", None)),
            "tv": _number(getattr(progress, "tv_loss", None)),
        },
        "elapsed_s": _number(getattr(progress, "elapsed_s", None)),
        "its_per_s": _number(getattr(progress, "its_per_s", None)),
        "eta_s": _number(getattr(progress, "eta_s", None)),
        "updated_at": time.time(),
    }


class ProgressReporter:
    """The ``callback`` a stylize task hands to the engine.

    ``save_preview(iteration, image)`` stores a preview; it is called when at least
    ``preview_every`` iterations have passed since the last one (the engine calls back every
    ``progress_every`` iterations, which need not divide ``preview_every``). A failing preview
    upload is logged, never fatal: previews are a courtesy, the job is the result.
    """

    def __init__(
        self,
        task: _Task,
        job_id: str,
        *,
        preview_every: int,
        save_preview: Callable[[int, Any], None] | None = None,
        scale_offset: int = 0,
        num_scales: int | None = None,
        iteration_offset: int = 0,
        total: int | None = None,
    ) -> None:
        self.task = task
        self.job_id = job_id
        self.preview_every = preview_every
        self.save_preview = save_preview
        self.scale_offset = scale_offset
        self.num_scales = num_scales
        self.iteration_offset = iteration_offset
        self.total = total
        self.last_meta: dict[str, Any] | None = None
        self._last_preview = 0

    def __call__(self, progress: Any) -> None:
        meta = progress_meta(
            progress, self.job_id, scale_offset=self.scale_offset, num_scales=self.num_scales,
            iteration_offset=self.iteration_offset, total=self.total,
        )
        self.last_meta = meta
        self.task.update_state(state=PROGRESS_STATE, meta=meta)
        try:
            self.task.send_event(PROGRESS_EVENT, retry=False, **meta)
        except Exception as exc:  # noqa: BLE001 - an event is best-effort; the state is the record
            log.debug("could not send %s for %s: %s", PROGRESS_EVENT, self.job_id, exc)
        self._maybe_preview(progress)

    def _maybe_preview(self, progress: Any) -> None:
        if self.save_preview is None or self.preview_every <= 0:
            return
        iteration = int(progress.iteration)
        if iteration - self._last_preview < self.preview_every:
            return
        self._last_preview = iteration
        try:
            self.save_preview(iteration, progress.preview())
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("preview at iteration %d of %s not stored: %s", iteration, self.job_id, exc)
