"""Small shared flags that producers and workers both reach: cancel, delivery counts, job claims.

They live in the result backend's key-value store, because that is the one store every
producer and every worker is already configured for: Redis in a deployment, a folder for the
zero-server default. Nothing here goes through the broker, so a flag set while a job runs is seen
by the optimisation loop at its next poll.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

from celery import Celery

from stylequeue.exceptions import ConfigError
from stylequeue.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

KEY_PREFIX = "stylequeue-"
ACTIVE_INDEX = f"{KEY_PREFIX}active-jobs"


class KeyValue(Protocol):
    """What the control flags need: atomic ``add`` and ``incr``, and one small index of members.

    The index (``index_add`` and friends) lists the jobs that have not ended, so the recovery
    sweep (:mod:`stylequeue.scheduler.recovery`) never has to scan every key of the backend;
    scored indexes read a page at a time (``index_range``) are the job history's
    (:mod:`stylequeue.tasks.history`), whose records change by compare-and-set (``replace_if``).
    """

    def get(self, key: str) -> str | None: ...
    def add(self, key: str, value: str, ttl_s: int | None = None) -> bool: ...
    def renew(self, key: str, value: str, ttl_s: int) -> bool: ...
    def delete_if(self, key: str, value: str) -> bool: ...
    def put(self, key: str, value: str) -> None: ...
    def replace_if(self, key: str, old: str, new: str) -> bool: ...
    def incr(self, key: str) -> int: ...
    def delete(self, key: str) -> None: ...
    def index_add(self, index: str, member: str, score: float | None = None) -> None: ...
    def index_remove(self, index: str, member: str) -> None: ...
    def index_members(self, index: str) -> list[str]: ...
    def index_range(self, index: str, high: float | None, low: float | None, offset: int,
                    count: int) -> list[tuple[str, float]]: ...


class RedisKeyValue:
    """Control keys in the Redis result backend; they expire with the results."""

    def __init__(self, client: object, expires_s: int) -> None:
        self.client = client
        self.expires_s = expires_s

    def get(self, key: str) -> str | None:
        value = self.client.get(key)  # type: ignore[attr-defined]
        return value.decode() if isinstance(value, bytes) else value

    def add(self, key: str, value: str, ttl_s: int | None = None) -> bool:
        return bool(self.client.set(key, value, nx=True, ex=ttl_s or self.expires_s))  # type: ignore[attr-defined]

    # Compare-and-set in one round trip: only the holder of ``value`` extends or drops the key.
    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    _DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
    _REPLACE_IF = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                   "redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1 end return 0")

    def renew(self, key: str, value: str, ttl_s: int) -> bool:
        return bool(self.client.eval(self._RENEW, 1, key, value, ttl_s))  # type: ignore[attr-defined]

    def delete_if(self, key: str, value: str) -> bool:
        return bool(self.client.eval(self._DELETE_IF, 1, key, value))  # type: ignore[attr-defined]

    def put(self, key: str, value: str) -> None:
        self.client.set(key, value, ex=self.expires_s)  # type: ignore[attr-defined]

    def replace_if(self, key: str, old: str, new: str) -> bool:
        return bool(self.client.eval(self._REPLACE_IF, 1, key, old, new, self.expires_s))  # type: ignore[attr-defined]

    def incr(self, key: str) -> int:
        pipe = self.client.pipeline()  # type: ignore[attr-defined]
        pipe.incr(key)
        pipe.expire(key, self.expires_s)
        return int(pipe.execute()[0])

    def delete(self, key: str) -> None:
        self.client.delete(key)  # type: ignore[attr-defined]

    # A sorted set scored by the time a member joined: oldest first, and members older than
    # the results themselves can be dropped by score (their records have expired). The set itself
    # expires with the results after its last addition, as every control key does.
    def index_add(self, index: str, member: str, score: float | None = None) -> None:
        pipe = self.client.pipeline()  # type: ignore[attr-defined]
        pipe.zadd(index, {member: time.time() if score is None else score})
        pipe.expire(index, self.expires_s)
        pipe.execute()

    def index_remove(self, index: str, member: str) -> None:
        self.client.zrem(index, member)  # type: ignore[attr-defined]

    def index_members(self, index: str) -> list[str]:
        self.client.zremrangebyscore(index, "-inf", time.time() - self.expires_s)  # type: ignore[attr-defined]
        return [m.decode() if isinstance(m, bytes) else m
                for m in self.client.zrange(index, 0, -1)]  # type: ignore[attr-defined]

    def index_range(self, index: str, high: float | None, low: float | None, offset: int,
                    count: int) -> list[tuple[str, float]]:
        """(member, score) with ``low <= score <= high``, highest first (equal scores: member
        descending), from ``offset``; members older than the results are dropped first."""
        self.client.zremrangebyscore(index, "-inf", time.time() - self.expires_s)  # type: ignore[attr-defined]
        rows = self.client.zrevrangebyscore(  # type: ignore[attr-defined]
            index, "+inf" if high is None else repr(high), "-inf" if low is None else repr(low),
            start=offset, num=count, withscores=True)
        return [(m.decode() if isinstance(m, bytes) else m, float(score)) for m, score in rows]


class FileKeyValue:
    """Control keys as files next to the file result backend's results (one machine).

    ``add`` uses O_EXCL and ``incr`` an flock, so concurrent worker processes stay correct.
    Celery's own result cleanup removes them once they are older than ``result_expires``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key

    def get(self, key: str) -> str | None:
        try:
            return self._path(key).read_text() or None
        except FileNotFoundError:
            return None

    def add(self, key: str, value: str, ttl_s: int | None = None) -> bool:
        path = self._path(key)
        if ttl_s is not None:
            try:
                if time.time() - path.stat().st_mtime > ttl_s:
                    path.unlink(missing_ok=True)  # an expired lock, as Redis would have dropped it
            except FileNotFoundError:
                pass
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        return True

    def renew(self, key: str, value: str, ttl_s: int) -> bool:
        """Touch the key if it still holds ``value``: ``add`` counts a key's age from its mtime."""
        if self.get(key) != value:
            return False
        os.utime(self._path(key))
        return True

    def delete_if(self, key: str, value: str) -> bool:
        if self.get(key) != value:
            return False
        self.delete(key)
        return True

    def put(self, key: str, value: str) -> None:
        atomic_write_bytes(self._path(key), value.encode())

    def replace_if(self, key: str, old: str, new: str) -> bool:
        """Compare-and-set under an flock of a lock file beside the key (``put`` replaces the key's
        file, so the key itself cannot carry the lock)."""
        fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.get(key) != old:
                return False
            self.put(key, new)
            return True

    def incr(self, key: str) -> int:
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            count = int(fh.read() or 0) + 1
            fh.seek(0)
            fh.truncate()
            fh.write(str(count))
        return count

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _index_dir(self, index: str) -> Path:
        folder = self.folder / f"{index}.index"
        folder.mkdir(exist_ok=True)
        return folder

    def index_add(self, index: str, member: str, score: float | None = None) -> None:
        """A member is an empty file; its score is its mtime (now, unless given)."""
        path = self._index_dir(index) / member
        path.touch()
        if score is not None:
            os.utime(path, ns=(int(score * 1e9),) * 2)

    def index_remove(self, index: str, member: str) -> None:
        (self._index_dir(index) / member).unlink(missing_ok=True)

    def _scored(self, index: str) -> list[tuple[float, str]]:
        entries = []
        for path in self._index_dir(index).iterdir():
            try:
                entries.append((path.stat().st_mtime_ns / 1e9, path.name))
            except FileNotFoundError:
                continue  # removed while we listed it
        return sorted(entries)

    def index_members(self, index: str) -> list[str]:
        return [name for _, name in self._scored(index)]

    def index_range(self, index: str, high: float | None, low: float | None, offset: int,
                    count: int) -> list[tuple[str, float]]:
        """As :meth:`RedisKeyValue.index_range`; one machine's index is small enough to list whole."""
        rows = [(name, score) for score, name in reversed(self._scored(index))
                if (high is None or score <= high) and (low is None or score >= low)]
        return rows[offset:offset + count]


def key_value(app: Celery) -> KeyValue:
    """The control store behind ``app``'s result backend (Redis or file)."""
    backend = app.backend
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "incr"):
        return RedisKeyValue(client, int(app.conf.result_expires or 7 * 24 * 3600))
    path = getattr(backend, "path", None)
    if path is not None:
        return FileKeyValue(path.decode() if isinstance(path, bytes) else path)
    raise ConfigError(
        f"the result backend {type(backend).__name__} cannot hold cancel flags and job claims; "
        "set STYLEQUEUE_RESULT_BACKEND to a redis:// URL (or leave it empty for the file default)"
    )


class JobControl:
    """Cancel flags, delivery counters and submit-time claims for jobs, by job id."""

    def __init__(self, app: Celery, store: KeyValue | None = None) -> None:
        self.store = store or key_value(app)

    # Cancellation -------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        """Ask every task of ``job_id`` to stop; honoured at the next poll or task start."""
        self.store.add(f"{KEY_PREFIX}cancel-{job_id}", str(time.time()))

    def is_cancelled(self, job_id: str) -> bool:
        return self.store.get(f"{KEY_PREFIX}cancel-{job_id}") is not None

    def clear_cancel(self, job_id: str) -> None:
        self.store.delete(f"{KEY_PREFIX}cancel-{job_id}")

    # Redeliveries -------------------------------------------------------------------------
    def count_delivery(self, task_id: str, retries: int) -> int:
        """How many times this task message (id + retry number) has started, this one included.

        A retry is a new message with the same task id, so the retry number is part of the key:
        only redeliveries of the same message (worker killed, connection lost) add up.
        """
        return self.store.incr(f"{KEY_PREFIX}deliveries-{task_id}-{retries}")

    # Idempotent submission ----------------------------------------------------------------
    def claim(self, job_id: str, record: dict[str, Any]) -> bool:
        """Store ``record`` for ``job_id`` unless one exists: True for the first submitter only.

        The record (task ids, result URI) is what lets ``stylequeue status JOB_ID`` find a job
        from its id alone, in another process.
        """
        return self.store.add(f"{KEY_PREFIX}job-{job_id}", json.dumps(record))

    def claim_output(self, prefix: str, job_id: str) -> str:
        """Bind the output ``prefix`` to ``job_id`` unless another job has it; returns its owner.

        A prefix holds one job's result.json and checkpoint: two jobs sharing one would read each
        other's. The binding lasts as long as the job's record (``result_expires``).
        """
        key = f"{KEY_PREFIX}output-{hashlib.sha256(prefix.encode()).hexdigest()[:32]}"
        if self.store.add(key, job_id):
            return job_id
        return self.store.get(key) or job_id  # (expired between the two calls: nobody holds it)

    def record_tiles(self, job_id: str, tile_pass: int, plan: dict[str, Any], task_ids: Sequence[str]) -> None:
        """Note a tiled pass's plan and tile task ids (known once the content's size is)."""
        self.store.put(f"{KEY_PREFIX}tiles-{job_id}-p{tile_pass}", json.dumps({"plan": plan, "task_ids": list(task_ids)}))

    def tiles(self, job_id: str, passes: int = 2) -> dict[str, dict[str, Any]]:
        """{pass: {"plan", "task_ids"}} of the passes planned so far."""
        out = {}
        for tile_pass in range(passes):
            raw = self.store.get(f"{KEY_PREFIX}tiles-{job_id}-p{tile_pass}")
            if raw:
                out[str(tile_pass)] = json.loads(raw)
        return out

    def record(self, job_id: str) -> dict[str, Any] | None:
        """The record stored when ``job_id`` was submitted, or None for an unknown id."""
        raw = self.store.get(f"{KEY_PREFIX}job-{job_id}")
        return json.loads(raw) if raw else None

    def release(self, job_id: str, task_ids: Sequence[str] = (), max_retries: int = 0) -> None:
        """Let ``job_id`` be submitted again (after it failed or was cancelled), from a clean slate."""
        self.store.delete(f"{KEY_PREFIX}job-{job_id}")
        self.clear_cancel(job_id)
        for task_id in task_ids:
            self.store.delete(f"{KEY_PREFIX}redrives-{task_id}")
            self.clear_missing(task_id)
            self.forget_leased(task_id)
            for retries in range(max_retries + 1):
                self.store.delete(f"{KEY_PREFIX}deliveries-{task_id}-{retries}")

    # Recovery of lost messages (stylequeue.scheduler.recovery) ------------------------------------
    def track(self, job_id: str) -> None:
        """List ``job_id`` among the jobs that have not ended (the recovery sweep reads them)."""
        self.store.index_add(ACTIVE_INDEX, job_id)

    def untrack(self, job_id: str) -> None:
        self.store.index_remove(ACTIVE_INDEX, job_id)

    def active_jobs(self) -> list[str]:
        """Tracked job ids, oldest first (ids older than the results' expiry are dropped)."""
        return self.store.index_members(ACTIVE_INDEX)

    def remember_message(self, task_id: str, message: dict[str, Any]) -> None:
        """Keep what it takes to send ``task_id``'s message again, should the broker lose it."""
        self.store.put(f"{KEY_PREFIX}sent-{task_id}", json.dumps(message))

    def sent_message(self, task_id: str) -> dict[str, Any] | None:
        raw = self.store.get(f"{KEY_PREFIX}sent-{task_id}")
        return json.loads(raw) if raw else None

    def missing_since(self, task_id: str, now: float) -> float:
        """When a sweep first found ``task_id``'s message on no queue (``now`` on the first call)."""
        key = f"{KEY_PREFIX}missing-{task_id}"
        self.store.add(key, repr(now))
        value = self.store.get(key)
        return float(value) if value else now

    def clear_missing(self, task_id: str) -> None:
        self.store.delete(f"{KEY_PREFIX}missing-{task_id}")

    def count_redrive(self, task_id: str) -> int:
        """How many times ``task_id`` has been sent again by recovery, this time included."""
        return self.store.incr(f"{KEY_PREFIX}redrives-{task_id}")

    # Leases of running GPU tasks (stylequeue.tasks.lease), one per task: a tiled job's tiles
    # run at once on several workers, each under its own lease.
    def take_lease(self, task_id: str, holder: str, ttl_s: int) -> bool:
        """Hold ``task_id``'s lease as ``holder`` unless someone holds it; marks the task leased."""
        if not self.store.add(f"{KEY_PREFIX}lease-{task_id}", holder, ttl_s=ttl_s):
            return False
        self.store.put(f"{KEY_PREFIX}leased-{task_id}", holder)
        return True

    def renew_lease(self, task_id: str, holder: str, ttl_s: int) -> bool:
        return self.store.renew(f"{KEY_PREFIX}lease-{task_id}", holder, ttl_s)

    def lease_holder(self, task_id: str) -> str | None:
        return self.store.get(f"{KEY_PREFIX}lease-{task_id}")

    def drop_lease(self, task_id: str, holder: str) -> None:
        self.store.delete_if(f"{KEY_PREFIX}lease-{task_id}", holder)

    def was_leased(self, task_id: str) -> bool:
        """Has a worker ever held a lease while running ``task_id``? (Then a missing lease means
        it died; before that the task may merely be starting.)"""
        return self.store.get(f"{KEY_PREFIX}leased-{task_id}") is not None

    def forget_leased(self, task_id: str) -> None:
        self.store.delete(f"{KEY_PREFIX}leased-{task_id}")

    # Draining workers (a SIGTERM'd worker's tasks hand their jobs back) ----------------------
    def mark_draining(self, hostname: str, ttl_s: int) -> None:
        self.store.add(f"{KEY_PREFIX}draining-{hostname}", str(time.time()), ttl_s=ttl_s)

    def clear_draining(self, hostname: str) -> None:
        self.store.delete(f"{KEY_PREFIX}draining-{hostname}")

    def draining_since(self, hostname: str) -> float | None:
        value = self.store.get(f"{KEY_PREFIX}draining-{hostname}")
        return float(value) if value else None

    def forget_delivery(self, task_id: str, retries: int) -> None:
        """Forget a delivery that handed its job back on purpose (not a crash: no poison count)."""
        self.store.delete(f"{KEY_PREFIX}deliveries-{task_id}-{retries}")

    def lock(self, name: str, ttl_s: int) -> bool:
        """A lock that frees itself after ``ttl_s`` (a crashed holder cannot keep it)."""
        return self.store.add(f"{KEY_PREFIX}lock-{name}", str(time.time()), ttl_s=ttl_s)

    def unlock(self, name: str) -> None:
        self.store.delete(f"{KEY_PREFIX}lock-{name}")
