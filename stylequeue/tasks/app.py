"""The Celery app and its configuration, and nothing else.

Workers start it with ``celery -A stylequeue.tasks.app worker -Q gpu``; producers, the scheduler
and Flower import it too, so this module must stay light: no torch, no engine imports. The tasks
live in the modules of :data:`TASK_MODULES`, which only a worker imports (through ``include``): a
job's chain (tasks/chain.py), a group's contact sheet (tasks/sheet.py) and beat's periodic work
(scheduler/beat.py). Producers send tasks by their names below.

Every value here comes from :class:`stylequeue.settings.Settings`; the choices that are not
settings are the ones minutes-long GPU jobs need (late acks, prefetch of one, re-queue when a
worker process dies, JSON only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings, load_settings, redact_url
from stylequeue.tasks.broker import is_redis_broker

# Explicit, namespaced task names: producers send by name and never import the task module.
TASK_VALIDATE = "stylequeue.validate"
TASK_STYLIZE = "stylequeue.stylize"
TASK_PUBLISH = "stylequeue.publish"
# A tiled job's final scale (tasks/tiles.py): plan the tiles, run each on a GPU, blend them.
TASK_TILES = "stylequeue.tiles"
TASK_TILE = "stylequeue.tile"
TASK_BLEND = "stylequeue.blend"
TASK_CONTACT_SHEET = "stylequeue.contact_sheet"
TASK_SCAN_MANIFESTS = "stylequeue.scan_manifests"
TASK_EXPIRE_PREVIEWS = "stylequeue.expire_previews"
TASK_RECOVER = "stylequeue.recover"
# One webhook delivery of a job's lifecycle event (tasks/webhook.py): light queue, never a GPU's.
TASK_WEBHOOK = "stylequeue.webhook"
# The messages of a job (and a batch's sheet): remembered when sent, re-sent if the broker loses one.
JOB_TASKS = frozenset({TASK_VALIDATE, TASK_STYLIZE, TASK_PUBLISH, TASK_CONTACT_SHEET, TASK_TILES, TASK_TILE,
                       TASK_BLEND})

# What a worker imports to know every task above.
TASK_MODULES = ("stylequeue.tasks.chain", "stylequeue.tasks.tiles", "stylequeue.tasks.sheet",
                "stylequeue.tasks.webhook", "stylequeue.scheduler.beat")

# Redis emulates priorities with one list per step; 0 is served first (the opposite of AMQP).
PRIORITY_STEPS = list(range(10))
DEFAULT_PRIORITY = 5


def _filesystem_broker_options(settings: Settings) -> dict[str, Any]:
    """Folders for kombu's filesystem transport: one machine, no server.

    Producer and worker must read and write the same folder, so ``data_folder_in`` and
    ``data_folder_out`` are one path. kombu does not create them, so we do.
    """
    root = Path(settings.data_dir) / "broker"
    folders = {
        "data_folder_in": root / "queue",
        "data_folder_out": root / "queue",
        "control_folder": root / "control",
        "processed_folder": root / "processed",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return {key: str(path) for key, path in folders.items()}


def _check_limits(settings: Settings) -> None:
    """A visibility timeout shorter than a job makes Redis hand a running job to a second worker."""
    if settings.job_soft_time_limit >= settings.job_time_limit:
        raise ConfigError(
            f"job_soft_time_limit ({settings.job_soft_time_limit}s) must be below job_time_limit "
            f"({settings.job_time_limit}s) so a job can clean up before it is killed"
        )
    if settings.recover_after_s and settings.recover_after_s <= settings.job_time_limit:
        raise ConfigError(
            f"recover_after_s ({settings.recover_after_s}s) must exceed job_time_limit "
            f"({settings.job_time_limit}s): a worker busy with a job may hold the next message "
            "unread that long, and re-sending it sooner would run it twice"
        )
    if settings.lease_ttl_s < 3:
        raise ConfigError(f"lease_ttl_s must be at least 3 s (it is renewed every third), got {settings.lease_ttl_s}")
    if settings.shutdown_grace_s < 0 or settings.recover_every_s < 1:
        raise ConfigError("shutdown_grace_s must be >= 0 and recover_every_s >= 1")
    if settings.webhook_timeout_s <= 0 or settings.webhook_retry_for_s < 0 or settings.webhook_progress_every_s < 0:
        raise ConfigError("webhook_timeout_s must be > 0, webhook_retry_for_s and webhook_progress_every_s >= 0")
    if settings.visibility_timeout <= settings.job_time_limit:
        raise ConfigError(
            f"visibility_timeout ({settings.visibility_timeout}s) must exceed job_time_limit "
            f"({settings.job_time_limit}s), or Redis redelivers jobs that are still running; "
            "raise STYLEQUEUE_VISIBILITY_TIMEOUT"
        )


def _restore_options(settings: Settings) -> dict[str, int]:
    """How often workers sweep Redis for messages of dead workers (docs/reliability.md).

    A worker killed outright leaves its job in kombu's ``unacked`` hash; a live worker puts it
    back on the queue once it is older than the visibility timeout, but only when its periodic
    sweep runs: by default every 10 s x a throttle of 10. Sweeping every eighth of the visibility
    timeout (1 to 60 s, throttle 1) bounds the extra wait to a fraction of the timeout itself.

    The sweep holds a Redis lock (``unacked_mutex``) for the milliseconds it takes; kombu lets it
    expire after 300 s. A broker restart while a worker holds it leaves it behind (appendonly keeps
    it, the release fails), and no worker restores anything until it expires: jobs of dead
    workers, and jobs terminated by the connection loss, then wait five minutes. Twice the sweep
    interval (at least 10 s) is plenty for a sweep, and concurrent sweeps are safe anyway (each
    restore is a WATCH transaction on the ``unacked`` hash).
    """
    interval = max(1, min(60, settings.visibility_timeout // 8))
    return {"unacked_restore_interval": interval, "unacked_restore_throttle": 1,
            "unacked_mutex_expire": max(10, 2 * interval)}


def _sentinel_options(settings: Settings, url: str) -> dict[str, str]:
    """A ``sentinel://`` URL names sentinels, not a server: kombu and Celery also need the master's name."""
    if not url.startswith("sentinel://"):
        return {}
    if not settings.redis_sentinel_master:
        raise ConfigError(
            f"{redact_url(url)} is a Redis Sentinel URL: set STYLEQUEUE_REDIS_SENTINEL_MASTER to the "
            "name of the master the sentinels watch"
        )
    return {"master_name": settings.redis_sentinel_master}


def _queues(settings: Settings) -> tuple[Queue, Queue]:
    # x-max-priority matters on AMQP brokers; Redis uses priority_steps below instead.
    return tuple(
        Queue(
            name,
            Exchange(name, type="direct"),
            routing_key=name,
            queue_arguments={"x-max-priority": max(PRIORITY_STEPS)},
        )
        for name in (settings.gpu_queue, settings.light_queue)
    )


def _routes(settings: Settings) -> dict[str, dict[str, str]]:
    """All routing in one place: the optimisation takes a GPU, everything else is light."""
    light = {"queue": settings.light_queue, "routing_key": settings.light_queue}
    return {
        TASK_VALIDATE: light,
        TASK_STYLIZE: {"queue": settings.gpu_queue, "routing_key": settings.gpu_queue},
        TASK_PUBLISH: light,
        TASK_TILES: light,
        TASK_TILE: {"queue": settings.gpu_queue, "routing_key": settings.gpu_queue},
        TASK_BLEND: light,
        TASK_CONTACT_SHEET: light,
        TASK_SCAN_MANIFESTS: light,
        TASK_EXPIRE_PREVIEWS: light,
        TASK_RECOVER: light,
        TASK_WEBHOOK: light,
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic work for ``stylequeue beat``: pick up dropped manifests, expire old previews,
    re-send job messages the broker lost (docs/reliability.md)."""
    # A sweep that waits on the queue behind a long backlog is useless by the next one.
    expires = {"expires": float(settings.recover_every_s)}
    return {
        "scan-manifests": {"task": TASK_SCAN_MANIFESTS, "schedule": float(settings.scan_manifests_every_s)},
        "expire-previews": {"task": TASK_EXPIRE_PREVIEWS, "schedule": float(settings.expire_previews_every_s)},
        "recover-lost-messages": {"task": TASK_RECOVER, "schedule": float(settings.recover_every_s),
                                  "options": expires},
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` as a plain dict (printed by ``--help``-style tools)."""
    _check_limits(settings)
    broker_url = settings.resolved_broker_url
    backend_url = settings.resolved_result_backend
    broker_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout,
                                      **_sentinel_options(settings, broker_url)}
    backend_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout,
                                       **_sentinel_options(settings, backend_url)}
    if is_redis_broker(broker_url):
        broker_options.update(queue_order_strategy="priority", priority_steps=PRIORITY_STEPS,
                              **_restore_options(settings))
    if broker_url.startswith("filesystem://"):
        broker_options.update(_filesystem_broker_options(settings))
    if backend_url.startswith("file://"):
        Path(backend_url[len("file://"):]).mkdir(parents=True, exist_ok=True)

    return {
        "broker_url": broker_url,
        "result_backend": backend_url,
        # JSON only: a pickled message is refused, so no producer can make a worker run code.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Minutes-long jobs: acknowledge after the work, take one at a time, and put a job back
        # on the queue when its worker process dies (redeliveries are bounded in jobs.py).
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # A redelivered message of a task that already succeeded is dropped, not run twice.
        "worker_deduplicate_successful_tasks": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Celery reads the visibility timeout from both option dicts (broker and result backend).
        "broker_transport_options": broker_options,
        "result_backend_transport_options": backend_options,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_time_limit,
        "task_track_started": True,
        "result_expires": settings.result_expires,
        # A Redis restart must not lose a state write (a job would look RUNNING forever, or a
        # task terminated on connection loss would look REVOKED): retry them until it is back.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_extended": True,
        # Events for Flower: task-sent from producers, the rest (and task-progress) from workers.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "task_queues": _queues(settings),
        "task_default_queue": settings.light_queue,
        "task_default_exchange": settings.light_queue,
        "task_default_routing_key": settings.light_queue,
        "task_default_priority": DEFAULT_PRIORITY,
        "task_queue_max_priority": max(PRIORITY_STEPS),
        "task_routes": _routes(settings),
        "beat_schedule": beat_schedule(settings),
        "beat_schedule_filename": str(Path(settings.data_dir) / "celerybeat-schedule"),
        "timezone": "UTC",
        "enable_utc": True,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """Build the stylequeue Celery app from ``settings`` (or from the environment)."""
    settings = settings or load_settings()
    app = Celery("stylequeue", include=list(TASK_MODULES), set_as_current=False,
                 # RecordingAMQP (tasks/sent.py) that also labels each job message for Flower
                 # (tasks/labels.py); named, not imported: labels.py reads this module's names.
                 amqp="stylequeue.tasks.labels:LabelledAMQP")
    app.stylequeue_recorded_tasks = JOB_TASKS  # type: ignore[attr-defined]
    app.conf.update(celery_config(settings))
    # Tasks, the scheduler and the beat schedule read the same Settings the app was built from.
    app.stylequeue_settings = settings  # type: ignore[attr-defined]
    return app


def settings_of(app: Celery) -> Settings:
    """The :class:`Settings` an app was built with (``load_settings()`` for a foreign app)."""
    return getattr(app, "stylequeue_settings", None) or load_settings()


app = make_app()
