"""Start Flower for the stylequeue app, with basic auth required.

``stylequeue flower`` runs Flower in this process on the Celery app built from
:class:`~stylequeue.settings.Settings`, so the broker and result backend are the ones the workers
use. The documented equivalent on the command line (which puts the password in the process table,
hence not what we run) is::

    celery -A stylequeue.tasks.app flower --address=127.0.0.1 --port=5555 \\
        --basic-auth=USER:PASSWORD --persistent=False --purge_offline_workers=300 \\
        --tasks_columns=args,state,result,received,started,runtime,worker,name,uuid

Credentials are set on Flower's options object directly, never on ``argv``: ``ps`` shows every
user a process's argv. Flower 2.x serves ``/metrics`` and ``/healthcheck`` WITHOUT checking basic
auth (their handlers carry no ``@authenticated``), so the port must be network-restricted; see
docs/monitoring.md.

A job is three or more tasks; each row tells its job and step in ``args`` and, while it runs, its
percentage and ETA in ``result`` (how, and why there: :mod:`stylequeue.tasks.labels`).
:func:`task_url` is the Flower page of the task to look at for a job (``stylequeue status``).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import quote

from celery import states
from celery.result import AsyncResult

from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings
from stylequeue.tasks.progress import PROGRESS_STATE, stopped_text

if TYPE_CHECKING:
    from stylequeue.scheduler.jobs import JobHandle

log = logging.getLogger(__name__)

# The columns of Flower's /tasks page, the job first: args begins "job <id> · step k of n · <what>",
# result holds a running task's percentage and ETA (tasks/labels.py); then timings, worker, the
# task name (a link to its siblings) and uuid (a link to its page). kwargs ({'step': 0}, a tile's
# plan) says nothing args does not.
TASKS_COLUMNS = "args,state,result,received,started,runtime,worker,name,uuid"
# Longest args/kwargs/result string Flower shows; our tasks take ids and URIs, never images.
MAX_FIELD_CHARS = 200


def parse_basic_auth(value: str) -> list[str]:
    """``"alice:pw1,bob:pw2"`` -> ``["alice:pw1", "bob:pw2"]``; a ConfigError on a malformed pair."""
    pairs = [p.strip() for p in value.split(",") if p.strip()]
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            raise ConfigError(
                "STYLEQUEUE_FLOWER_BASIC_AUTH must be 'user:password' pairs separated by commas; "
                f"got a pair for user {user or '(empty)'!r} without a user or password"
            )
    return pairs


def check_auth(settings: Settings) -> list[str]:
    """The basic-auth pairs to enforce, or a ConfigError saying how to set them.

    Returns ``[]`` only when ``flower_insecure_no_auth`` is set explicitly.
    """
    if settings.flower_basic_auth.strip():
        return parse_basic_auth(settings.flower_basic_auth)
    if settings.flower_insecure_no_auth:
        return []
    raise ConfigError(
        "Flower refuses to start without authentication: anyone who reaches it can revoke and "
        "send tasks. Set STYLEQUEUE_FLOWER_BASIC_AUTH=user:password (or flower_basic_auth in the "
        "STYLEQUEUE_CONFIG file). For a throw-away local session only, set "
        "STYLEQUEUE_FLOWER_INSECURE_NO_AUTH=1."
    )


def _truncate(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        return value[: MAX_FIELD_CHARS - 3] + "..."
    return value


def format_task(task: Any) -> Any:
    """Flower's ``format_task`` hook, for the /tasks page and a task's page (not /api/*): keep
    long args, kwargs and results from flooding the page, and show how a job's task ended.

    Celery's event state ranks a custom state such as PROGRESS above REVOKED (``states.precedence``),
    so a task cancelled while it ran keeps PROGRESS, with its ``revoked`` time set: shown here
    as REVOKED unless progress came after it (the message ran again). A task that ended without
    a result still holds its last progress as its result: shown as where it stopped.
    """
    for attr in ("args", "kwargs", "result"):
        setattr(task, attr, _truncate(getattr(task, attr, None)))
    state, revoked = getattr(task, "state", None), getattr(task, "revoked", None)
    if state == PROGRESS_STATE and revoked and revoked >= (getattr(task, "timestamp", None) or 0):
        task.state = states.REVOKED
    if getattr(task, "state", None) in (states.FAILURE, states.REVOKED, states.RETRY):
        task.result = stopped_text(task.result) or task.result
    return task


def task_to_watch(job: "JobHandle") -> str:
    """The id of the job's task to open in Flower: the latest one running (a tiled pass's tiles
    before their planner), else the latest one that has a state, else the first (it waits)."""
    tiles = job.tile_ids()
    ordered: list[str] = []
    for task_id in job.task_ids:
        ordered.append(task_id)
        if ".tiles." in task_id:
            ordered += tiles.get(int(task_id.rpartition(".")[2]), [])
    latest = None
    for task_id in reversed(ordered):
        state = AsyncResult(task_id, app=job.app).state
        if state not in states.READY_STATES and state != states.PENDING:
            return task_id  # started and not finished: STARTED, PROGRESS, RETRY
        latest = latest or (task_id if state != states.PENDING else None)
    return latest or ordered[0]


def task_url(settings: Settings, task_id: str) -> str:
    """Flower's page of one task, at the URL users reach Flower at (``flower_url``)."""
    return f"{settings.resolved_flower_url}/task/{quote(task_id, safe='')}"


def job_task_url(job: "JobHandle") -> str:
    """Flower's page of the task to look at for ``job`` (what ``stylequeue status`` prints)."""
    from stylequeue.tasks.app import settings_of

    return task_url(settings_of(job.app), task_to_watch(job))


def flower_argv(settings: Settings, extra_args: Sequence[str] = ()) -> list[str]:
    """The ``celery flower`` arguments, without credentials (those never go on argv)."""
    return [
        "flower",
        f"--address={settings.flower_address}",
        f"--port={settings.flower_port}",
        "--persistent=False",
        f"--purge_offline_workers={settings.flower_purge_offline_workers}",
        f"--tasks_columns={TASKS_COLUMNS}",
        *extra_args,
    ]


def _apply_flower_options(auth: list[str]) -> None:
    """Set what must not be on argv on Flower's (tornado) options object."""
    from flower.options import options

    options.format_task = format_task
    if auth:
        options.basic_auth = auth
        return
    # Flower 2.x answers 401 on its API without auth unless this is set; the operator asked
    # for no auth explicitly, so make the API usable and say so loudly.
    os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    log.warning("Flower is running WITHOUT authentication (flower_insecure_no_auth is set)")


def run_flower(settings: Settings, extra_args: Sequence[str] = ()) -> int:
    """Run Flower for the app built from ``settings`` until it is stopped; returns an exit code."""
    auth = check_auth(settings)
    from stylequeue.tasks.app import make_app

    app = make_app(settings)
    _apply_flower_options(auth)
    result = app.start(argv=flower_argv(settings, extra_args))
    return int(result or 0)
