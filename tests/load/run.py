"""The load test's engine, also a script: ``python -m tests.load.run [--jobs 500]``.

500 small jobs (32 px, 2 iterations) through two GPU workers and a light worker on real Redis and
S3 servers, then the figures: duration, jobs per minute, peak broker memory (Redis ``INFO
used_memory``, sampled every half second), jobs lost (no result.json for a submitted id), jobs done
twice (result.json written more than once in the versioned bucket, or a stylize message delivered
more than once), and whether results expire as configured (every result key has a TTL of at most
``result_expires``, and none is left once that time has passed after the last job).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stylequeue.tasks.control import KEY_PREFIX, JobControl
from testbed.s3 import S3Server
from tests.service.fault_stack import Stack, job_spec, start_stack

RESULT_PREFIX = b"celery-task-meta-"


@dataclass
class LoadReport:
    jobs: int
    gpu_workers: int
    submit_s: float = 0.0
    duration_s: float = 0.0
    jobs_per_min: float = 0.0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    duplicates: int = 0
    redelivered: int = 0
    baseline_used_memory: int = 0
    peak_used_memory: int = 0
    max_result_ttl_s: int = 0
    results_left_after_expiry: int = -1
    # Cancel flags, delivery counters, job records, remembered messages: they expire with results.
    control_keys_left_after_expiry: int = -1
    active_jobs_left: int = -1  # the recovery sweep's index of jobs not ended, once all have
    result_expires_s: int = 0
    errors: list[str] = field(default_factory=list)

    def table(self) -> str:
        mib = 1024 * 1024
        rows = [
            ("jobs submitted", self.jobs), ("GPU workers", self.gpu_workers),
            ("submit time", f"{self.submit_s:.1f} s"),
            ("duration (submit to last result)", f"{self.duration_s:.1f} s"),
            ("throughput", f"{self.jobs_per_min:.0f} jobs/min"), ("succeeded", self.succeeded),
            ("failed", self.failed), ("lost (no result.json)", self.lost),
            ("done twice (result.json versions > 1)", self.duplicates),
            ("stylize messages delivered more than once", self.redelivered),
            ("broker used_memory, baseline", f"{self.baseline_used_memory / mib:.1f} MiB"),
            ("broker used_memory, peak", f"{self.peak_used_memory / mib:.1f} MiB"),
            ("result_expires", f"{self.result_expires_s} s"),
            ("largest result-key TTL seen", f"{self.max_result_ttl_s} s"),
            ("result keys left after expiry", self.results_left_after_expiry),
            ("control keys left after expiry", self.control_keys_left_after_expiry),
            ("jobs still in the active index", self.active_jobs_left),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class MemorySampler:
    """Samples Redis ``used_memory`` in a thread; ``peak`` is the largest value seen."""

    def __init__(self, client: Any, every_s: float = 0.5) -> None:
        self.client, self.every_s = client, every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))
            except Exception:  # noqa: BLE001 - a missed sample is not a result
                pass
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _wait_all(stack: Stack, jobs: list[Any], timeout: float) -> tuple[set[str], dict[str, str]]:
    """Poll the result backend (one MGET per round) until every job's chain has ended."""
    backend = stack.redis.client(1)
    pending = {job.job_id: job for job in jobs}
    done: set[str] = set()
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        ids = list(pending)
        keys = [RESULT_PREFIX + f"{pending[j].task_ids[k]}".encode() for j in ids for k in (0, 1, 2)]
        values = backend.mget(keys)
        for n, job_id in enumerate(ids):
            states = [json.loads(v)["status"] if v else "PENDING" for v in values[3 * n:3 * n + 3]]
            if states[2] == "SUCCESS":
                done.add(job_id)
                del pending[job_id]
            elif "FAILURE" in states:
                failed[job_id] = str(pending.pop(job_id).error())
        time.sleep(0.5)
    for job_id in pending:
        failed[job_id] = "did not end within the timeout"
    return done, failed


def _count_outcomes(stack: Stack, jobs: list[Any], report: LoadReport) -> None:
    """Lost and duplicate jobs, from storage (result.json versions) and the delivery counters."""
    versions: dict[str, int] = {}
    for page in stack.s3.get_paginator("list_object_versions").paginate(
            Bucket=stack.bucket, Prefix="stylequeue/jobs/"):
        for version in page.get("Versions", []):
            if version["Key"].endswith("/result.json"):
                job_id = version["Key"].split("/")[-2]
                versions[job_id] = versions.get(job_id, 0) + 1
    submitted = {job.job_id for job in jobs}
    report.lost = len(submitted - set(versions))
    report.duplicates = sum(1 for j in submitted if versions.get(j, 0) > 1)
    # Each delivery of a stylize message logs one "received" line in the worker that took it
    # (the delivery counters in the backend expire with the results, the logs do not).
    logs = "\n".join(w.log_text() for w in stack.gpu)
    report.redelivered = sum(1 for job in jobs if logs.count(f"[{job.task_ids[1]}] received") > 1)
    never_ran = [job.job_id for job in jobs if f"[{job.task_ids[1]}] received" not in logs]
    if never_ran:
        report.errors.append(f"{len(never_ran)} stylize steps never reached a worker: {never_ran[:5]}")
    unknown = set(versions) - submitted
    if unknown:
        report.errors.append(f"results for ids never submitted: {sorted(unknown)[:5]}")


def _result_keys(stack: Stack, prefix: bytes = RESULT_PREFIX) -> list[bytes]:
    return list(stack.redis.client(1).scan_iter(match=prefix + b"*", count=1000))


def _expiring_keys(stack: Stack) -> list[bytes]:
    return _result_keys(stack) + _result_keys(stack, KEY_PREFIX.encode())


def run_load(jobs: int = 500, gpu_workers: int = 2, result_expires: int = 60,
             wait_for_expiry: bool = True, tmp: Path | None = None, log: Any = print) -> LoadReport:
    """Run the load test on fresh servers and return its figures."""
    from stylequeue.scheduler import submit

    report = LoadReport(jobs=jobs, gpu_workers=gpu_workers, result_expires_s=result_expires)
    tmp = tmp or Path(tempfile.mkdtemp(prefix="stylequeue-load-"))
    env = {"STYLEQUEUE_RESULT_EXPIRES": str(result_expires), "STYLEQUEUE_CHECKPOINT_EVERY": "0"}
    with S3Server() as s3, start_stack(s3, tmp, gpu_workers=gpu_workers, versioned=True,
                                       extra_env=env) as stack:
        content = stack.put_png("in/content.png", (48, 32), 1)
        style = stack.put_png("in/style.png", (40, 40), 2)
        broker = stack.redis.client(0)
        report.baseline_used_memory = int(broker.info("memory")["used_memory"])
        with MemorySampler(broker) as memory:
            started = time.monotonic()
            handles = [submit(job_spec(content, style, job_id=f"load-{n:04d}"), app=stack.app)
                       for n in range(jobs)]
            report.submit_s = time.monotonic() - started
            log(f"submitted {jobs} jobs in {report.submit_s:.1f} s")
            done, failed = _wait_all(stack, handles, timeout=max(600.0, jobs * 3.0))
            report.duration_s = time.monotonic() - started
        report.peak_used_memory = memory.peak
        report.succeeded, report.failed = len(done), len(failed)
        report.errors.extend(f"{k}: {v}" for k, v in list(failed.items())[:10])
        report.jobs_per_min = 60.0 * len(done) / report.duration_s if report.duration_s else 0.0
        log(f"{len(done)} succeeded, {len(failed)} failed in {report.duration_s:.1f} s")
        _count_outcomes(stack, handles, report)
        report.active_jobs_left = len(JobControl(stack.app).active_jobs())
        backend = stack.redis.client(1)
        # TTL -1: no expiry (a leak); -2: the key expired between the scan and this call.
        ttls = [int(backend.ttl(k)) for k in _result_keys(stack)]
        report.max_result_ttl_s = max(ttls, default=0)
        if -1 in ttls:
            report.errors.append(f"{ttls.count(-1)} result keys have no TTL")
        if wait_for_expiry:
            log(f"waiting up to {result_expires + 5} s for results to expire")
            deadline = time.monotonic() + result_expires + 5
            while _expiring_keys(stack) and time.monotonic() < deadline:
                time.sleep(1.0)
            report.results_left_after_expiry = len(_result_keys(stack))
            report.control_keys_left_after_expiry = len(_result_keys(stack, KEY_PREFIX.encode()))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--gpu-workers", type=int, default=2)
    parser.add_argument("--result-expires", type=int, default=60)
    parser.add_argument("--no-expiry-wait", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    report = run_load(args.jobs, args.gpu_workers, args.result_expires, not args.no_expiry_wait)
    print(report.table())
    for error in report.errors:
        print("error:", error)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    ok = report.succeeded == report.jobs and not report.lost and not report.duplicates
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
