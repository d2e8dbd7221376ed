"""Batcher with real threads: jobs that arrive together run together, each gets its own outcome."""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import pytest

from stylequeue.worker.batcher import Batcher, Mailbox


class Recorder:
    """A run_batch that records each batch and returns job * 10, or the job's exception."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[int] = set()
        self.delay_s = delay_s

    def __call__(self, jobs: list[Any]) -> Sequence[Any]:
        self.batches.append(list(jobs))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        return [job if isinstance(job, BaseException) else job * 10 for job in jobs]


def _submit_all(batcher: Batcher, jobs: list[tuple[Any, Any]], stagger_s: float = 0.0) -> list[Any]:
    """Submit (job, key) pairs from one thread each; return each thread's result or exception."""
    out: list[Any] = [None] * len(jobs)

    def worker(i: int, job: Any, key: Any) -> None:
        try:
            out[i] = batcher.submit(job, key)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out[i] = exc

    threads = [threading.Thread(target=worker, args=(i, job, key)) for i, (job, key) in enumerate(jobs)]
    for t in threads:
        t.start()
        time.sleep(stagger_s)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return out


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def test_jobs_from_three_threads_within_the_window_run_as_one_batch(recorder: Recorder) -> None:
    batcher = Batcher(recorder, batch_max=8, window_s=0.3)
    try:
        results = _submit_all(batcher, [(1, "a"), (2, "a"), (3, "a")], stagger_s=0.02)
    finally:
        batcher.close(5)
    assert results == [10, 20, 30]
    assert [sorted(b) for b in recorder.batches] == [[1, 2, 3]]
    assert list(batcher.sizes) == [3]
    assert len(recorder.threads) == 1 and threading.get_ident() not in recorder.threads


def test_incompatible_jobs_run_separately(recorder: Recorder) -> None:
    batcher = Batcher(recorder, batch_max=8, window_s=0.2)
    try:
        results = _submit_all(batcher, [(1, "512x512"), (2, "256x256"), (3, "512x512"), (4, "256x256")])
    finally:
        batcher.close(5)
    assert results == [10, 20, 30, 40]
    assert sorted(sorted(b) for b in recorder.batches) == [[1, 3], [2, 4]]


def test_batch_max_is_respected(recorder: Recorder) -> None:
    batcher = Batcher(recorder, batch_max=2, window_s=0.2)
    try:
        results = _submit_all(batcher, [(n, "k") for n in range(1, 6)])
    finally:
        batcher.close(5)
    assert results == [10, 20, 30, 40, 50]
    assert sorted(len(b) for b in recorder.batches) == [1, 2, 2]


def test_a_job_after_the_window_waits_for_the_next_batch() -> None:
    recorder = Recorder(delay_s=0.2)
    batcher = Batcher(recorder, batch_max=8, window_s=0.05)
    try:
        results = _submit_all(batcher, [(1, "k"), (2, "k")], stagger_s=0.12)
    finally:
        batcher.close(5)
    assert results == [10, 20] and recorder.batches == [[1], [2]]


def test_an_exception_goes_to_its_own_job_only(recorder: Recorder) -> None:
    batcher = Batcher(recorder, batch_max=8, window_s=0.2)
    bad = ValueError("job 2 is broken")
    try:
        results = _submit_all(batcher, [(1, "k"), (bad, "k"), (3, "k")])
    finally:
        batcher.close(5)
    assert results[0] == 10 and results[2] == 30 and results[1] is bad
    assert len(recorder.batches) == 1


def test_a_failing_batch_is_run_again_job_by_job() -> None:
    """When run_batch itself raises (one item broke the whole batch), only that item fails."""
    seen: list[list[int]] = []

    def run_batch(jobs: list[int]) -> list[int]:
        seen.append(list(jobs))
        if 2 in jobs:
            raise RuntimeError("cannot batch job 2")
        return [j * 10 for j in jobs]

    batcher = Batcher(run_batch, batch_max=8, window_s=0.2)
    try:
        results = _submit_all(batcher, [(1, "k"), (2, "k"), (3, "k")])
    finally:
        batcher.close(5)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], RuntimeError) and "job 2" in str(results[1])
    assert len(seen[0]) == 3 and sorted(len(b) for b in seen[1:]) == [1, 1, 1]


def test_posted_calls_run_in_the_submitting_thread_and_a_failure_stops_the_job() -> None:
    callers: list[int] = []
    stopped: list[bool] = []

    def run_batch(jobs: list[tuple[Mailbox, bool]]) -> list[str]:
        for box, fail in jobs:
            box.post(lambda: callers.append(threading.get_ident()))
            if fail:
                box.post(lambda: (_ for _ in ()).throw(OSError("upload failed")))
        time.sleep(0.1)  # the task threads serve their mailboxes meanwhile
        stopped.extend(box.failed.is_set() for box, _ in jobs)
        return ["done"] * len(jobs)

    batcher: Batcher = Batcher(run_batch, batch_max=2, window_s=0.2)
    boxes = [Mailbox(), Mailbox()]
    outcomes: dict[int, Any] = {}
    idents: dict[int, int] = {}

    def worker(i: int) -> None:
        idents[i] = threading.get_ident()
        try:
            outcomes[i] = batcher.submit((boxes[i], i == 1), "k", boxes[i])
        except OSError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.close(5)
    assert outcomes[0] == "done" and isinstance(outcomes[1], OSError)
    assert sorted(callers) == sorted(idents.values())  # each call ran in its own job's thread
    assert stopped == [False, True]


def test_closed_batcher_refuses_new_jobs(recorder: Recorder) -> None:
    batcher = Batcher(recorder, batch_max=2, window_s=0.0)
    assert batcher.submit(4, "k") == 40
    batcher.close(5)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(5, "k")
    with pytest.raises(ValueError):
        Batcher(recorder, batch_max=0, window_s=0.1)
