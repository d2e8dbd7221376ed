"""The periodic tasks Celery beat sends (``stylequeue beat``; the schedule is in tasks/app.py):
pick up dropped manifests, expire old previews, re-send job messages the broker lost.

They are scheduling work, so they live with the scheduler; a worker loads them through the app's
``include`` and runs them on the light queue.
"""

from __future__ import annotations

import re
import time
from typing import Any

from stylequeue.scheduler.manifest import scan_incoming
from stylequeue.scheduler.recovery import recover as sweep
from stylequeue.tasks.app import TASK_EXPIRE_PREVIEWS, TASK_RECOVER, TASK_SCAN_MANIFESTS, app
from stylequeue.tasks.base import JobTask, settings
from stylequeue.worker.resources import resources_for

_PREVIEW_TIME = re.compile(r"-t(\d+)\.png$")


@app.task(bind=True, base=JobTask, name=TASK_SCAN_MANIFESTS)
def scan_manifests(self: JobTask) -> dict[str, Any]:
    """Submit manifests dropped under <storage_root>/manifests/incoming/."""
    return scan_incoming(self.app, resources_for(settings).storage)


@app.task(bind=True, base=JobTask, name=TASK_EXPIRE_PREVIEWS)
def expire_previews(self: JobTask) -> dict[str, Any]:
    """Delete previews older than ``preview_retention_days`` (their names carry the time)."""
    if settings.preview_retention_days <= 0:
        return {"deleted": 0}
    store = resources_for(settings).storage
    cutoff = time.time() - settings.preview_retention_days * 86400
    deleted = 0
    for uri in store.list(f"{settings.resolved_storage_root}/jobs/"):
        match = _PREVIEW_TIME.search(uri)
        if "/previews/" in uri and match and int(match.group(1)) < cutoff:
            store.delete(uri)
            deleted += 1
    return {"deleted": deleted}


@app.task(bind=True, base=JobTask, name=TASK_RECOVER)
def recover(self: JobTask) -> dict[str, Any]:
    """Re-send job messages the broker lost (:mod:`stylequeue.scheduler.recovery`)."""
    return sweep(self.app)


__all__ = ["expire_previews", "recover", "scan_manifests"]
