"""A running stylize step's lease on its job, and the one question the engine's ``should_stop`` asks.

Why a lease (one per GPU task: a stylize step, or one tile of a tiled job): with Redis, a message
held by a worker that vanished (SIGKILL, an OOM-killed container, a lost node, a preempted spot
instance) comes back only after the visibility timeout,
two hours by default. The lease is a key naming its holder with a short expiry (``lease_ttl_s``),
renewed by a heartbeat thread while the step runs; it lapses within ``lease_ttl_s`` of the
worker's death, and beat's sweep (scheduler/recovery.py) then sends the step again: another worker
takes the lease and resumes the job's checkpoint.

Fencing: a holder that was only paused or cut off finds its lease gone or taken at its next
check; it stops and writes nothing more (``Lease.held`` is asked before every write). A delivery
that finds the lease held by a live holder does nothing.

Draining: a worker told to stop (SIGTERM: a deploy, a spot preemption with two minutes or less)
marks itself draining; a step that cannot finish within ``shutdown_grace_s`` checkpoints at once
and hands its message back to the queue instead of being killed mid-job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable

from stylequeue.tasks.control import JobControl

log = logging.getLogger(__name__)


class LeaseHeldError(Exception):
    """Another live worker holds the job's lease: this delivery of its step must do nothing."""


class Lease:
    """``with Lease(...)``: hold the job's lease while the block runs, renewed every ttl/3."""

    def __init__(self, control: JobControl, job_id: str, task_id: str, *, ttl_s: int, hostname: str) -> None:
        self.control, self.job_id, self.task_id, self.ttl_s = control, job_id, task_id, ttl_s
        self.holder = f"{hostname}/{task_id}/{uuid.uuid4().hex[:8]}"
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        if not self.control.take_lease(self.task_id, self.holder, self.ttl_s):
            raise LeaseHeldError(f"{self.task_id} is running under lease {self.control.lease_holder(self.task_id)}")
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost.is_set():
            try:
                self.control.drop_lease(self.task_id, self.holder)
            except Exception as err:  # noqa: BLE001 - it expires by itself within ttl_s
                log.warning("could not drop the lease of %s (%s); it expires in %d s", self.job_id, err, self.ttl_s)

    def _beat(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.control.renew_lease(self.task_id, self.holder, self.ttl_s):
                    self._lose("its lease lapsed or another worker took it")
                    return
                renewed = time.monotonic()
            except Exception as err:  # noqa: BLE001 - a broker hiccup: keep trying while the lease lasts
                if time.monotonic() - renewed > self.ttl_s:
                    self._lose(f"it could not renew its lease for {self.ttl_s} s ({err})")
                    return

    def _lose(self, why: str) -> None:
        log.warning("job %s: this worker stops and writes nothing more: %s", self.job_id, why)
        self.lost.set()

    def held(self) -> bool:
        """Still ours? A fresh read, asked right before each write."""
        if self.lost.is_set():
            return False
        if self.control.lease_holder(self.task_id) != self.holder:
            self._lose("another worker holds its lease")
            return False
        return True


class StopPoller:
    """``should_stop`` for the engine: the job was cancelled, its lease was lost, or the worker is
    draining and this step cannot finish within the grace left. Redis is read at most every
    ``interval_s``; ``reason`` says why it stopped."""

    def __init__(self, control: JobControl, job_id: str, *, lease: Lease | None = None, hostname: str = "",
                 grace_s: float = 0.0, remaining_s: Callable[[], float | None] = lambda: None,
                 interval_s: float = 0.5) -> None:
        self.control, self.job_id, self.lease, self.hostname = control, job_id, lease, hostname
        self.grace_s, self.remaining_s, self.interval_s = grace_s, remaining_s, interval_s
        self.reason: str | None = None
        self._checked_at = 0.0

    def __call__(self) -> bool:
        if self.reason is None and self.lease is not None and self.lease.lost.is_set():
            self.reason = "lease lost"
        now = time.monotonic()
        if self.reason is None and now - self._checked_at >= self.interval_s:
            self._checked_at = now
            try:
                self.reason = self._poll()
            except Exception as exc:  # noqa: BLE001 - redis-py's and the file store's errors alike
                # The backend is briefly unreachable (a Redis restart): no reason to fail a running
                # job; ask again at the next poll (the lease's heartbeat has its own deadline).
                log.warning("cannot read the control flags of %s (%s); will ask again", self.job_id, exc)
        return self.reason is not None

    def _poll(self) -> str | None:
        if self.control.is_cancelled(self.job_id):
            return "cancelled"
        since = self.control.draining_since(self.hostname) if self.hostname else None
        if since is not None:
            left = self.grace_s - (time.time() - since)
            remaining = self.remaining_s()
            if remaining is None or remaining > left:
                return "draining"
        return None


def mark_draining(control: JobControl, hostname: str, grace_s: float) -> None:
    """What a worker's main process does on SIGTERM (celery's worker_shutting_down)."""
    try:
        control.mark_draining(hostname, ttl_s=int(grace_s) + 600)
    except Exception as exc:  # noqa: BLE001 - then its jobs simply run on until killed, as before
        log.warning("could not mark %s as draining (%s)", hostname, exc)


def remaining_seconds(progress: Any, end_iteration: int) -> float | None:
    """Seconds this step still needs, from its latest Progress (None before the first)."""
    if progress is None or not progress.its_per_s:
        return None
    return max(0, end_iteration - progress.iteration) / progress.its_per_s
