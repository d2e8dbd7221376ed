"""Turn the engine's progress callback into Celery states, Flower events and preview images.

The engine calls back with a ``Progress`` dataclass and knows nothing of Celery; this is the
one place that translates it: a ``PROGRESS`` state for ``AsyncResult.info`` (what
``JobHandle.progress()`` reads), a custom ``task-progress`` event for Flower's event stream (its
``result`` field the percentage and ETA Flower shows, :func:`progress_text`), and now and then a
preview image under the job's output prefix.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from stylequeue.engine.result import Progress

log = logging.getLogger(__name__)

PROGRESS_STATE = "PROGRESS"
PROGRESS_EVENT = "task-progress"
# Between the parts of what Flower shows of a task (progress_text here, tasks/labels.py's labels).
SEP = " · "
# progress_text's shape without its ETA: where a task that ended without a result had got to.
_PROGRESS_TEXT = re.compile(r"\d{1,3}% · iteration \d+ of \d+")


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


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def progress_text(meta: Mapping[str, Any]) -> str:
    """A PROGRESS meta as Flower's result of a running task: ``37% · iteration 74 of 200 · ETA 12 s``."""
    iteration, total = int(meta.get("iteration") or 0), int(meta.get("total") or 0)
    percent = 100 * iteration // total if total else 0
    text = f"{percent}%{SEP}iteration {iteration} of {total}"
    eta = meta.get("eta_s")
    return text + (f"{SEP}ETA {_duration(eta)}" if eta is not None else "")


def stopped_text(value: Any) -> str | None:
    """``stopped at 37% · iteration 74 of 200`` for a :func:`progress_text`; None for anything else.

    Flower keeps a task's last progress as its result when it fails or is cancelled (only
    task-succeeded carries a result); shown as it is, it would still promise an ETA.
    """
    match = _PROGRESS_TEXT.match(value) if isinstance(value, str) else None
    return f"stopped at {match.group(0)}" if match else None


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
            # result: what Flower can show of a running task's progress (why: tasks/labels.py).
            self.task.send_event(PROGRESS_EVENT, retry=False, **meta, result=progress_text(meta))
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
