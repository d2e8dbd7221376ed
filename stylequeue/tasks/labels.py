"""How a job's tasks read in Flower: the job, its step, and how far a running step is.

Flower shows tasks, and a job is three or more of them. What Flower shows of a task is fixed by
Celery's event state (``celery.events.state.Task``): its /tasks page, ``/api/tasks`` and
``/api/task/info/<id>`` serve ``Task.as_dict()``, the fields in ``Task._fields`` (name, state,
args, kwargs, result, times, worker, ...). A custom event such as ``task-progress`` sets its
state (``PROGRESS``) and keeps its other fields (iteration, total, eta_s) on Flower's Task, but
``as_dict()`` leaves them out, and so does the copy that Flower's ``format_task`` hook receives
(``copy.copy`` goes through ``Task.__reduce__``, which is ``as_dict()``). So the job is told in
two of those fields, by what our own messages and events carry:

* ``args``: every job message is sent with an ``argsrepr`` that starts with the job and its step
  and ends with its inputs (``job cat-1 · step 2 of 3 · stylize, scale 1 of 1 · cat.jpg styled as
  wave.jpg``) instead of the repr of the whole spec, which Flower cuts at 400 px anyway. Celery
  puts ``argsrepr`` in the message header; the producer's ``task-sent`` and the worker's
  ``task-received`` events carry it as ``args``. :class:`LabelledAMQP` sets it where Celery makes
  every message of the app (``as_task_v2``), so chains, chords, ``Task.replace``, retries and the
  recovery sweep's re-sends are all labelled alike, from the message alone.
* ``result``: each ``task-progress`` event carries ``result=progress_text(meta)``
  (tasks/progress.py: ``37% · iteration 74 of 200 · ETA 12 s``). The result backend stores a
  PROGRESS state's meta as the task's result, so this is the same thing in Flower's terms;
  ``task-succeeded`` replaces it with the real result.

What only the page can mend (a task cancelled while it ran, which Celery's event state leaves in
PROGRESS) is done by Flower's ``format_task`` hook: stylequeue/monitoring/flower.py.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from stylequeue.job import JobSpec
from stylequeue.tasks.app import TASK_BLEND, TASK_PUBLISH, TASK_STYLIZE, TASK_TILE, TASK_TILES, TASK_VALIDATE
from stylequeue.tasks.progress import SEP
from stylequeue.tasks.sent import RecordingAMQP

log = logging.getLogger(__name__)


def _step(name: str, kwargs: Mapping[str, Any], steps: int, passes: int, scales: int) -> tuple[int, str] | None:
    """(position in the chain, counted from 1; what the task does) for a job task's name."""
    tile_pass = int(kwargs.get("tile_pass", 0))
    of_passes = f"pass {tile_pass + 1} of {passes}"
    if name == TASK_VALIDATE:
        return 1, "validate"
    if name == TASK_STYLIZE:
        step = int(kwargs.get("step", 0))
        return 2 + step, f"stylize, scale {step + 1} of {scales}"
    if name in (TASK_TILES, TASK_BLEND):  # the blend runs under its pass's planner id, in its place
        return 2 + steps + tile_pass, f"{'plan tiles' if name == TASK_TILES else 'blend tiles'}, {of_passes}"
    if name == TASK_TILE:
        plan = kwargs.get("plan") or {}
        count = len(plan.get("rows", ())) * len(plan.get("columns", ()))  # TilePlan.tiles: rows x columns
        return 2 + steps + tile_pass, f"tile {int(kwargs.get('index', 0)) + 1} of {count}, {of_passes}"
    if name == TASK_PUBLISH:
        return 2 + steps + passes, "publish"
    return None


def task_label(name: str, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> str | None:
    """``job <id> · step <k> of <n> · <what> · <inputs>`` for a job task's message; None for any
    other task.

    From the message alone (the spec is its first argument), so whatever sends it labels it alike.
    """
    if not args or not isinstance(args[0], Mapping) or "job_id" not in args[0]:
        return None
    try:
        spec = JobSpec.parse(args[0])
        steps, passes = spec.stages()
        step = _step(name, kwargs or {}, steps, passes, spec.style_config().scales)
    except Exception as exc:  # noqa: BLE001 - a label is a courtesy; the message is sent regardless
        log.debug("no Flower label for %s: %s", name, exc)
        return None
    if step is None:
        return None
    position, what = step
    inputs = f"{_name(spec.content)} styled as {', '.join(_name(s) for s in spec.styles)}"
    return SEP.join((f"job {spec.job_id}", f"step {position} of {2 + steps + passes}", what, inputs))


def _name(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[2] or uri


class LabelledAMQP(RecordingAMQP):
    """The app's message maker: every job message remembered for recovery (RecordingAMQP) and
    sent with its label as ``argsrepr`` (see the module docstring)."""

    def as_task_v2(self, task_id: str, name: str, args: Any = None, kwargs: Any = None,
                   *rest: Any, **options: Any) -> Any:
        if options.get("argsrepr") is None:
            options["argsrepr"] = task_label(name, args, kwargs)  # None: Celery's own repr
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
