"""List past and present jobs from the job history (tasks/history.py), a page at a time.

```python
from stylequeue.scheduler import list_jobs
jobs, cursor = list_jobs(status="failed", since="1h", limit=50)
while cursor:
    more, cursor = list_jobs(status="failed", since="1h", limit=50, cursor=cursor)
```

Newest first (by the time each job was submitted). A cursor names the last job returned, so
pages neither skip nor repeat a job however many are submitted meanwhile. ``stylequeue jobs`` is
the same call on the command line.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any

from celery import Celery

from stylequeue.exceptions import ConfigError
from stylequeue.job import JobStatus
from stylequeue.scheduler.jobs import default_app
from stylequeue.tasks.history import STATUSES, JobHistory

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIMIT = 1000


def parse_since(value: str | float | datetime | None, *, now: float | None = None) -> float | None:
    """A lower bound on submit time as unix seconds: ``90s``, ``15m``, ``1h``, ``2d`` ago, an ISO
    time (``2024-05-01T12:00``, UTC unless it names a zone), a datetime, or unix seconds."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    text = value.strip()
    match = _AGO.fullmatch(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        return parse_since(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ConfigError(
            f"--since {value!r}: give a duration ago (90s, 15m, 1h, 2d) or an ISO time (2024-05-01T12:00Z)"
        ) from None


def list_jobs(status: str | JobStatus | None = None, since: str | float | datetime | None = None,
              limit: int = 50, cursor: str | None = None, *,
              app: Celery | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Job records (newest first) and the cursor of the next page (None when there is none).

    Each record: ``job_id``, ``status``, ``spec`` (content, styles, preset, size, iterations, ...),
    ``submitted_at``/``started_at``/``ended_at`` (unix seconds), ``worker``, ``result_uri``,
    ``metadata_uri``, ``error``, ``progress`` and ``delivery`` (the last webhook attempt).
    """
    wanted = status.value if isinstance(status, JobStatus) else status
    if wanted is not None and wanted not in STATUSES:
        raise ConfigError(f"status {wanted!r}: the history records {', '.join(STATUSES)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ConfigError(f"limit {limit}: give 1 to {MAX_LIMIT} and page with the cursor")
    return JobHistory(app or default_app()).page(wanted, parse_since(since), limit, cursor)


__all__ = ["list_jobs", "parse_since"]
