"""The queue's own cost, measured end to end on loopback: jobs/min, latency, overhead, batching.

Everything is real, as in tests/service: a private ``redis-server`` (broker and results), moto's
S3 server (testbed.s3), ``celery worker`` processes started exactly as ``stylequeue worker``
starts them (stylequeue.worker.launcher.plan_workers: prefork with one child per GPU-queue
worker, or a threads pool with ``--batch N``), a light worker (concurrency 2), and producers
calling :func:`stylequeue.scheduler.submit`. Weights are ``random:0``: true timings, no real
style transfer. Each GPU-queue worker runs on the CPU here with one torch thread.

Where the numbers come from:

* the producer's clock around each ``submit()`` call;
* Celery's task events (task-started / task-succeeded with ``runtime``), sent by the workers;
* each stylize step's ``clock`` in result.json (task start, engine start and end, wall clock)
  and the engine's own optimisation time (``timings.total_s``); ``published_at``.

Run ``python -m bench.service_bench --out bench/results [--quick]``; writes ``service_cpu.md``,
``service_cpu.json`` and two PNG plots (bench/service_report.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from stylequeue.scheduler import submit
from stylequeue.settings import Settings, load_settings
from stylequeue.tasks.app import make_app
from stylequeue.worker.launcher import plan_workers
from testbed.env import service_env_for
from testbed.redis import RedisServer
from testbed.s3 import S3Server
from testbed.workers import CeleryWorker, start_all, stop_all

WEIGHTS = "random:0"
CONTENTS = 4  # distinct content images, cycled over the jobs


@dataclass(frozen=True)
class JobSize:
    """One kind of job: output size (longest side) and Adam iterations."""

    name: str
    size: int
    iterations: int

    def params(self, seed: int) -> dict[str, Any]:
        return {"size": self.size, "iterations": self.iterations, "seed": seed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a few jobs, 32 px, 2 iterations)")
    p.add_argument("--tiny", default="48x5", help="SIZExITERATIONS of the small jobs (queue cost visible)")
    p.add_argument("--real", default="128x20", help="SIZExITERATIONS of the 'realistic small' jobs")
    p.add_argument("--tiny-jobs", type=int, default=40, help="small jobs per burst")
    p.add_argument("--real-jobs", type=int, default=8, help="realistic jobs per burst")
    p.add_argument("--idle-jobs", type=int, default=8, help="small jobs run one at a time (latency)")
    p.add_argument("--workers", default="1,2", help="GPU-queue worker processes to compare")
    p.add_argument("--batches", default="1,2,4", help="batch_max values for one worker")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a burst may take")
    args = p.parse_args(argv)
    if args.quick:
        args.tiny, args.real = "32x2", "48x3"
        args.tiny_jobs, args.real_jobs, args.idle_jobs = 4, 2, 2
    return args


def _size(text: str, name: str) -> JobSize:
    size, iterations = text.lower().split("x")
    return JobSize(name, int(size), int(iterations))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise over gradients: structure at every scale, like tests.conftest.make_image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0 * x], axis=-1)
    array = (0.5 * base + 0.5 * rng.random((height, width, 3), dtype=np.float32)) * 255
    return Image.fromarray(array.round().astype(np.uint8), "RGB")


class EventLog:
    """Celery task events (what Flower reads), collected in a thread: uuid -> type -> event."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.events: dict[str, dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._receiver: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="events")

    def _on_event(self, event: dict[str, Any]) -> None:
        if "uuid" in event:
            with self._lock:
                self.events.setdefault(event["uuid"], {})[event["type"]] = event

    def _run(self) -> None:
        with self.app.connection() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> "EventLog":
        self._thread.start()
        self._ready.wait(10)
        time.sleep(0.3)  # the receiver's queue is bound once capture() has consumed
        return self

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True

    def get(self, task_id: str, kind: str) -> dict[str, Any] | None:
        with self._lock:
            return self.events.get(task_id, {}).get(kind)


@dataclass
class Stack:
    """The servers, the light worker, a producer app and the event log, for the whole run."""

    env: dict[str, str]
    settings: Settings
    app: Any
    bucket: str
    s3: Any
    events: EventLog
    contents: list[str] = field(default_factory=list)
    style: str = ""
    logs: list[Path] = field(default_factory=list)

    def put_png(self, key: str, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=buffer.getvalue())
        return f"s3://{self.bucket}/{key}"

    def read_json(self, uri: str) -> dict[str, Any]:
        bucket, key = uri[len("s3://"):].split("/", 1)
        return json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@contextmanager
def service_stack(workdir: Path) -> Iterator[Stack]:
    """Redis, moto S3, a bucket with inputs, the light worker; all stopped at the end."""
    with RedisServer() as redis, S3Server() as s3:
        bucket = s3.make_bucket()
        env = service_env_for(redis, s3, bucket, workdir, STYLEQUEUE_WEIGHTS=WEIGHTS)
        settings = load_settings(environ=env)
        app = make_app(settings)
        light_plan = plan_workers(settings, [], queues=[settings.light_queue])[0]
        light = CeleryWorker({**env, **light_plan.env}, settings.light_queue, name="light",
                             concurrency=_arg(light_plan.argv, "--concurrency"))
        start_all([light])
        events = EventLog(app).start()
        stack = Stack(env, settings, app, bucket, s3.client(), events, logs=[light.log_path])
        stack.contents = [stack.put_png(f"in/content{i}.png", make_image(192, 144, 10 + i))
                          for i in range(CONTENTS)]
        stack.style = stack.put_png("in/style.png", make_image(160, 160, 2))
        try:
            yield stack
        finally:
            events.stop()
            stop_all([light])


def _arg(argv: list[str], flag: str) -> Any:
    value = argv[argv.index(flag) + 1]
    return int(value) if value.isdigit() else value


@contextmanager
def gpu_workers(stack: Stack, count: int, batch: int) -> Iterator[list[CeleryWorker]]:
    """``count`` GPU-queue workers with the argv and environment ``stylequeue worker --batch``
    gives them (CPU: no GPUs, so each is the launcher's cpu worker, one per process)."""
    plan = plan_workers(stack.settings, [], queues=[stack.settings.gpu_queue], batch=batch)[0]
    workers = [
        CeleryWorker({**stack.env, **plan.env}, stack.settings.gpu_queue, name=f"cpu{i}",
                     concurrency=_arg(plan.argv, "--concurrency"), pool=_arg(plan.argv, "--pool"))
        for i in range(count)
    ]
    start_all(workers)
    stack.logs.extend(w.log_path for w in workers)
    try:
        yield workers
    finally:
        stop_all(workers)


def _spec(stack: Stack, kind: JobSize, index: int, tag: str) -> dict[str, Any]:
    return {"job_id": f"{tag}-{index:03d}-{uuid.uuid4().hex[:6]}",
            "content": stack.contents[index % CONTENTS], "styles": [stack.style],
            "params": kind.params(index)}


def run_jobs(stack: Stack, kind: JobSize, count: int, tag: str, *, sequential: bool,
             timeout: float) -> list[dict[str, Any]]:
    """Submit ``count`` jobs (all at once, or each after the previous finished); their records."""
    submitted: list[tuple[Any, float, float]] = []
    for index in range(count):
        spec = _spec(stack, kind, index, tag)
        t0 = time.time()
        handle = submit(spec, app=stack.app)
        submitted.append((handle, t0, time.time()))
        if sequential:
            handle.wait(timeout=timeout, poll_s=0.05)
    deadline = time.monotonic() + timeout
    for handle, _, _ in submitted:
        handle.wait(timeout=max(1.0, deadline - time.monotonic()), poll_s=0.2)
    time.sleep(0.3)  # the last task-succeeded events are on their way
    return [job_record(stack, h, t0, t1) for h, t0, t1 in submitted]


def _event_time(stack: Stack, task_id: str, kind: str) -> float | None:
    event = stack.events.get(task_id, kind)
    return float(event["timestamp"]) if event else None


def _task_end(stack: Stack, task_id: str) -> float | None:
    """When the task's function returned: task-started + runtime. (task-succeeded itself is sent
    after the chain's next task, so the next task may start before it.)"""
    started = stack.events.get(task_id, "task-started")
    done = stack.events.get(task_id, "task-succeeded")
    if not started or not done or done.get("runtime") is None:
        return None
    return float(started["timestamp"]) + float(done["runtime"])


def _diff(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else round(end - start, 4)


def job_record(stack: Stack, handle: Any, t_submit: float, t_returned: float) -> dict[str, Any]:
    """One job's timeline, as seconds from its submit() call, and the phases of its overhead."""
    meta = stack.read_json(handle.metadata_uri)
    step = meta["steps"][-1]
    clock, timings = step.get("clock") or {}, step.get("timings") or {}
    ids = handle.task_ids
    validate_started = _event_time(stack, ids[0], "task-started")
    validate_done = _task_end(stack, ids[0])
    stylize_done = _task_end(stack, ids[-2])
    publish_started = _event_time(stack, ids[-1], "task-started")
    optimise = float(timings.get("total_s") or 0.0)
    total = meta["published_at"] - t_submit
    engine_wall = _diff(clock.get("engine_finished_at"), clock.get("engine_started_at"))
    return {
        "job_id": handle.job_id, "submitted_at": t_submit, "published_at": meta["published_at"],
        "random_weights": meta.get("random_weights"), "batch_size": step.get("batch_size"),
        "worker": step.get("worker"), "iterations": timings.get("iterations"),
        "total_s": round(total, 4), "optimise_s": optimise, "overhead_s": round(total - optimise, 4),
        "submit_call_s": round(t_returned - t_submit, 4),
        "submit_to_start_s": _diff(clock.get("started_at"), t_submit),
        "phases": {
            "queue_to_validate_s": _diff(validate_started, t_submit),
            "validate_s": _diff(validate_done, validate_started),
            "handoff_to_stylize_s": _diff(clock.get("started_at"), validate_done),
            "download_s": _diff(clock.get("engine_started_at"), clock.get("started_at")),
            "engine_extra_s": None if engine_wall is None else round(engine_wall - optimise, 4),
            "upload_s": _diff(stylize_done, clock.get("engine_finished_at")),
            "handoff_to_publish_s": _diff(publish_started, stylize_done),
            "publish_s": _diff(meta["published_at"], publish_started),
        },
    }


def percentile(values: list[float], q: float) -> float | None:
    clean = [v for v in values if v is not None]
    return round(float(np.percentile(clean, q)), 4) if clean else None


def summarize(records: list[dict[str, Any]], workers: int, batch: int, kind: JobSize,
              mode: str) -> dict[str, Any]:
    """Jobs/min over first submit -> last result.json, latency percentiles, median phases."""
    first = min(r["submitted_at"] for r in records)
    last = max(r["published_at"] for r in records)
    wall = last - first
    phases = {k: percentile([r["phases"][k] for r in records], 50) for k in records[0]["phases"]}
    return {
        "mode": mode, "workers": workers, "batch_max": batch, "size": kind.size,
        "iterations": kind.iterations, "kind": kind.name, "jobs": len(records),
        "wall_s": round(wall, 3), "jobs_per_min": round(60 * len(records) / wall, 2),
        # A batch's optimisation time is every member's total_s: count it once per batch.
        "optimise_share": round(sum(r["optimise_s"] / (r["batch_size"] or 1) for r in records)
                                / (wall * workers), 3),
        "submit_to_start_p50_s": percentile([r["submit_to_start_s"] for r in records], 50),
        "submit_to_start_p95_s": percentile([r["submit_to_start_s"] for r in records], 95),
        "total_p50_s": percentile([r["total_s"] for r in records], 50),
        "optimise_p50_s": percentile([r["optimise_s"] for r in records], 50),
        "overhead_p50_s": percentile([r["overhead_s"] for r in records], 50),
        "overhead_p95_s": percentile([r["overhead_s"] for r in records], 95),
        "submit_call_p50_s": percentile([r["submit_call_s"] for r in records], 50),
        # Engine seconds per iteration of one image: a batch's time shared by its members.
        "engine_s_per_image_it_p50": percentile(
            [r["optimise_s"] / max(r["iterations"] or 1, 1) / (r["batch_size"] or 1) for r in records], 50),
        "phases_p50_s": phases,
        "batch_sizes": sorted({r["batch_size"] for r in records if r["batch_size"] is not None}),
        "random_weights": all(r["random_weights"] for r in records),
    }


def _round(stack: Stack, kind: JobSize, count: int, workers: int, batch: int, mode: str,
           timeout: float, log: list[dict[str, Any]]) -> dict[str, Any]:
    tag = f"{mode}-w{workers}-b{batch}-{kind.name}"
    records = run_jobs(stack, kind, count, tag, sequential=mode == "idle", timeout=timeout)
    summary = summarize(records, workers, batch, kind, mode)
    summary["records"] = records
    log.append(summary)
    print(f"{tag}: {summary['jobs_per_min']} jobs/min, start p50 {summary['submit_to_start_p50_s']} s, "
          f"overhead p50 {summary['overhead_p50_s']} s", flush=True)
    return summary


def warm_up(stack: Stack, kind: JobSize, slots: int, timeout: float) -> None:
    """Jobs for every task slot, so every worker process has built its model before timing."""
    run_jobs(stack, kind, slots, "warmup", sequential=False, timeout=timeout)


def measure(args: argparse.Namespace, stack: Stack) -> list[dict[str, Any]]:
    """Every configuration in turn: worker counts (batch 1), then batch sizes (one worker)."""
    tiny, real = _size(args.tiny, "tiny"), _size(args.real, "realistic")
    runs: list[dict[str, Any]] = []
    configs = [(w, 1) for w in _ints(args.workers)]
    configs += [(1, b) for b in _ints(args.batches) if (1, b) not in configs]
    for workers, batch in configs:
        with gpu_workers(stack, workers, batch):
            warm_up(stack, tiny, 2 * workers * batch, args.timeout)
            if (workers, batch) == (1, 1):
                _round(stack, tiny, args.idle_jobs, 1, 1, "idle", args.timeout, runs)
            _round(stack, tiny, args.tiny_jobs, workers, batch, "burst", args.timeout, runs)
            _round(stack, real, args.real_jobs, workers, batch, "burst", args.timeout, runs)
    return runs


def machine() -> dict[str, Any]:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return {"uptime": uptime, "load_average": os.getloadavg(), "logical_cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.service_report import plot_batching, plot_workers, write_service_report

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started, before = time.time(), machine()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"sq-service-bench-{uuid.uuid4().hex[:8]}"
    with service_stack(workdir) as stack:
        runs = measure(args, stack)
    report: dict[str, Any] = {
        "weights": WEIGHTS, "random_weights": True, "device": "cpu",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "machine_before": before, "machine_after": machine(),
        "wall_seconds": round(time.time() - started, 1), "runs": runs,
    }
    report["plots"] = {name: p.name for name, p in (("workers", plot_workers(runs, args.out)),
                                                     ("batching", plot_batching(runs, args.out))) if p}
    (args.out / "service_cpu.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "service_cpu.md").write_text(write_service_report(report))
    print((args.out / "service_cpu.md").read_text())
    return report


if __name__ == "__main__":
    main()
