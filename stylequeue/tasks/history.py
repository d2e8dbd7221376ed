"""The job history: one durable record per job, listed newest first, a page at a time.

Producers used to learn a job's fate only from Celery's task states, and Flower forgets every task
when it restarts. The history is a record of each job (its status, spec summary, times, worker,
result URIs, error and last webhook delivery) that nothing but its expiry removes: it lives in the
result backend's key-value store beside the control flags (:mod:`stylequeue.tasks.control`; Redis
in a deployment, files for the zero-server default), expires with the results (``result_expires``)
and does not depend on Flower, a worker or beat being up. With Redis' append-only file on, it
survives a Redis restart.

Layout (every key under the control prefix)::

    stylequeue-history-job-<job_id>        the record, JSON; changed only by compare-and-set
    stylequeue-history-index               every job, scored by the time it was submitted
    stylequeue-history-index-<status>      the jobs in one status, scored the same

What a record changes to is decided by :mod:`stylequeue.tasks.lifecycle`; this module stores,
indexes and lists. An index is updated after the record, by whoever changed it, so an index may
briefly hold a member whose record has moved on or expired: listing reads the record of every
member it returns, skips and drops such members, and so never returns a job under a status it no
longer has. A status listing reads only that status' index, never every record.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from celery import Celery

from stylequeue.exceptions import ConfigError
from stylequeue.tasks.control import KEY_PREFIX, KeyValue, key_value

log = logging.getLogger(__name__)

RECORD_PREFIX = f"{KEY_PREFIX}history-job-"
INDEX = f"{KEY_PREFIX}history-index"
# Statuses a record can have: the lifecycle's (queued until a GPU task starts, running, the ends).
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "timed_out")
_CAS_TRIES = 50
_BATCH = 200

Update = Callable[[dict[str, Any] | None], dict[str, Any] | None]


def status_index(status: str) -> str:
    return f"{INDEX}-{status}"


def encode_cursor(score: float, job_id: str) -> str:
    """Where the next page starts: after ``job_id`` at ``score`` (readable, and a job id has no ':')."""
    return f"{score!r}:{job_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    score, sep, job_id = cursor.partition(":")
    try:
        if not sep or not job_id:
            raise ValueError(cursor)
        return float(score), job_id
    except ValueError:
        raise ConfigError(f"cursor {cursor!r} is not one a job listing returned; pass next_cursor as given") from None


class JobHistory:
    """The history records in ``app``'s result backend (or in ``store``)."""

    def __init__(self, app: Celery | None, store: KeyValue | None = None) -> None:
        self.store = store or key_value(app)  # type: ignore[arg-type]

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.store.get(RECORD_PREFIX + job_id)
        return json.loads(raw) if raw else None

    def change(self, job_id: str, update: Update) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Apply ``update`` (old record or None -> new record, or None for no change) atomically:
        (old, new), with ``new`` None when nothing changed. Concurrent writers retry on the new value."""
        key = RECORD_PREFIX + job_id
        for _ in range(_CAS_TRIES):
            raw = self.store.get(key)
            old = json.loads(raw) if raw else None
            new = update(old)
            if new is None:
                return old, None
            text = json.dumps(new, sort_keys=True)
            if self.store.add(key, text) if raw is None else self.store.replace_if(key, raw, text):
                self._reindex(job_id, old, new)
                return old, new
        raise RuntimeError(f"history record of {job_id} kept changing under {_CAS_TRIES} tries")

    def _reindex(self, job_id: str, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        score = float(new["submitted_at"])
        if old is None or old.get("submitted_at") != new["submitted_at"]:
            self.store.index_add(INDEX, job_id, score)
        if old is not None and old.get("status") != new["status"]:
            self.store.index_remove(status_index(old["status"]), job_id)
        if old is None or old.get("status") != new["status"] or old.get("submitted_at") != new["submitted_at"]:
            self.store.index_add(status_index(new["status"]), job_id, score)

    def page(self, status: str | None = None, since: float | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` records, newest first, submitted at ``since`` or later, in ``status``
        (any when None), after ``cursor``; and the cursor of the next page (None at the end)."""
        index = INDEX if status is None else status_index(status)
        high, after = decode_cursor(cursor) if cursor else (None, None)
        found: dict[str, tuple[float, dict[str, Any]]] = {}
        offset = 0
        while len(found) <= limit:
            rows = self.store.index_range(index, high, since, offset, max(_BATCH, limit + 1))
            if not rows:
                break
            offset += len(rows)
            for job_id, score in rows:
                if (after is not None and score == high and job_id >= after) or job_id in found:
                    continue  # on an earlier page (equal scores come in descending id order)
                record = self.get(job_id)
                if record is None or (status is not None and record.get("status") != status):
                    offset -= self._drop_stale(index, job_id, status)
                    continue
                found[job_id] = (score, record)
                if len(found) > limit:
                    break
        rows_out = list(found.items())[:limit]
        more = len(found) > limit
        return [rec for _, (_, rec) in rows_out], (encode_cursor(rows_out[-1][1][0], rows_out[-1][0]) if more else None)

    def _drop_stale(self, index: str, job_id: str, status: str | None) -> int:
        """Drop a member whose record expired or left this status; 1 when dropped (the index shifted)."""
        self.store.index_remove(index, job_id)
        record = self.get(job_id)  # moved back meanwhile (resubmitted at this very moment)?
        if record is not None and (status is None or record.get("status") == status):
            self.store.index_add(index, job_id, float(record["submitted_at"]))
            return 0
        return 1


__all__ = ["INDEX", "STATUSES", "JobHistory", "decode_cursor", "encode_cursor", "status_index"]
