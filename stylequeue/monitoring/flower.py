"""Start Flower for the stylequeue app, with basic auth required.

``stylequeue flower`` runs Flower in this process on the Celery app built from
:class:`~stylequeue.settings.Settings`, so the broker and result backend are the ones the workers
use. The documented equivalent on the command line (which puts the password in the process table,
hence not what we run) is::

    celery -A stylequeue.tasks.app flower --address=127.0.0.1 --port=5555 \\
        --basic-auth=USER:PASSWORD --persistent=False --purge_offline_workers=300 \\
        --tasks_columns=name,uuid,state,received,started,runtime,worker,args,kwargs,result

Credentials are set on Flower's options object directly, never on ``argv``: ``ps`` shows every
user a process's argv. Flower 2.x serves ``/metrics`` and ``/healthcheck`` WITHOUT checking basic
auth (their handlers carry no ``@authenticated``), so the port must be network-restricted; see
docs/monitoring.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings

log = logging.getLogger(__name__)

# The columns of Flower's /tasks page: readable name first, then state and timings, then the
# (small, URI-only) arguments and result, which format_task truncates.
TASKS_COLUMNS = "name,uuid,state,received,started,runtime,worker,args,kwargs,result"
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
    """Flower's ``format_task`` hook: keep long args, kwargs and results from flooding the page."""
    for attr in ("args", "kwargs", "result"):
        setattr(task, attr, _truncate(getattr(task, attr, None)))
    return task


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
