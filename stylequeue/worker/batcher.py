"""Batcher: task threads hand their jobs to one GPU thread, which runs compatible ones together.

With ``-P threads -c N`` every Celery task runs in its own thread and keeps Celery's acks,
retries, chains and results; it calls :meth:`Batcher.submit` and blocks there. The GPU thread
takes the oldest waiting job, waits up to ``window_s`` from its arrival for jobs with the same
compatibility key (up to ``batch_max``), runs them as one batch and hands each job its own
result or exception.

Work a job must do in its own thread (Celery's ``update_state`` and events read the task's
thread-local request; uploads should not hold up the GPU) is posted to that job's
:class:`Mailbox` by the GPU thread and run by the waiting task thread.

Pure threading: no Celery, no torch. Compatibility keys and the batch runner come from the caller.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")
_CALL, _DONE = "call", "done"


class Mailbox:
    """One job's line back to its own thread: calls to run there, then the job's outcome."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.failed = threading.Event()  # set when a posted call raised: the job should stop
        self.error: BaseException | None = None

    def post(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the job's thread (from the GPU thread; returns at once)."""
        self._queue.put((_CALL, call))

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self._queue.put((_DONE, (value, error)))

    def serve(self, tick: Callable[[], None] | None = None, every_s: float = 0.5) -> Any:
        """Run posted calls until the outcome arrives; return it or raise the job's error.

        ``tick`` runs in this thread at least every ``every_s`` while waiting (the task polls
        its cancel flag there, so the GPU thread never waits on Redis). An error in a posted
        call (say, an upload that failed) wins over the job's result: the job is reported
        failed, as it would have been had it run alone.
        """
        next_tick = time.monotonic()
        while True:
            if tick is not None and time.monotonic() >= next_tick:
                self._run(tick)
                next_tick = time.monotonic() + every_s
            try:
                kind, payload = self._queue.get(timeout=every_s if tick is not None else None)
            except queue.Empty:
                continue
            if kind == _CALL:
                self._run(payload)
                continue
            value, error = payload
            if self.error is not None:
                raise self.error
            if error is not None:
                raise error
            return value

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as exc:  # kept for the job; the GPU thread must not see it
            if self.error is None:
                self.error = exc
            self.failed.set()


@dataclass
class _Waiting(Generic[J]):
    job: J
    key: Hashable
    mailbox: Mailbox
    arrived: float = field(default_factory=time.monotonic)


class Batcher(Generic[J, R]):
    """Collects compatible jobs within a time window and runs them as one batch on one thread.

    ``run_batch(jobs)`` returns one result or exception per job, in order. If it raises
    instead, each job of that batch is run again alone, so one bad job fails only itself.
    """

    def __init__(
        self,
        run_batch: Callable[[list[J]], Sequence[R | BaseException]],
        *,
        batch_max: int,
        window_s: float,
        name: str = "stylequeue-gpu",
    ) -> None:
        if batch_max < 1 or window_s < 0:
            raise ValueError(f"batch_max must be >= 1 and window_s >= 0, got {batch_max}, {window_s}")
        self.run_batch = run_batch
        self.batch_max = batch_max
        self.window_s = window_s
        self.sizes: collections.deque[int] = collections.deque(maxlen=1000)  # recent batch sizes
        self._waiting: list[_Waiting[J]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, job: J, key: Hashable, mailbox: Mailbox | None = None, tick: Callable[[], None] | None = None
    ) -> R:
        """Queue ``job``; block, serving its mailbox (and ``tick``), until its batch ran; return or raise."""
        box = mailbox if mailbox is not None else Mailbox()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed; the worker is shutting down")
            self._waiting.append(_Waiting(job, key, box))
            self._cond.notify_all()
        return box.serve(tick)

    def close(self, timeout: float | None = None) -> None:
        """Run what is waiting, then stop the GPU thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Waiting[J]] | None:
        """The oldest job and its compatible followers, once the window closed or the batch filled."""
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._waiting[0]
            while True:
                batch = [w for w in self._waiting if w.key == head.key][: self.batch_max]
                left = head.arrived + self.window_s - time.monotonic()
                if len(batch) >= self.batch_max or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            for w in batch:
                self._waiting.remove(w)
            return batch

    def _run(self, batch: list[_Waiting[J]]) -> None:
        self.sizes.append(len(batch))
        waited = time.monotonic() - batch[0].arrived
        log.info("running a batch of %d job(s); the first waited %.3f s", len(batch), waited)
        try:
            outcomes = list(self.run_batch([w.job for w in batch]))
            if len(outcomes) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outcomes)} outcomes for {len(batch)} jobs")
        except BaseException as exc:  # noqa: BLE001 - handed to the jobs, never lost
            if len(batch) == 1:
                outcomes = [exc]
            else:
                log.warning("a batch of %d failed (%s); running its jobs one by one", len(batch), exc)
                for w in batch:
                    self._run([w])
                return
        for w, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                w.mailbox.finish(error=outcome)
            else:
                w.mailbox.finish(value=outcome)
