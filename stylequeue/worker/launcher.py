"""``stylequeue worker``: one ``celery worker`` process per GPU, plus an optional light worker.

Why one process per GPU instead of one worker with ``--concurrency N``: a prefork pool shares one
device choice among its children, and CUDA must never be initialised in a process that forks.
Each child here is started with ``CUDA_VISIBLE_DEVICES=<i>``, so inside it the GPU is always
``cuda:0``, it runs one job at a time (``--concurrency 1 --prefetch-multiplier 1``), and its
hostname (``gpu<i>@host``) names the GPU in Flower. This parent never imports torch: it counts
GPUs with ``nvidia-smi -L`` (or ``STYLEQUEUE_GPU_COUNT``), starts the children, forwards SIGTERM
and SIGINT to them (Celery's warm shutdown: finish the running job, then exit) and exits when they
have.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings
from stylequeue.worker.metrics import serve_worker_metrics

log = logging.getLogger(__name__)

APP_MODULE = "stylequeue.tasks.app"
GPU_COUNT_ENV = "STYLEQUEUE_GPU_COUNT"


@dataclass(frozen=True)
class WorkerProcess:
    """One ``celery worker`` child: its name, command line and environment changes."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def count_gpus() -> int:
    """GPUs on this machine, without initialising CUDA in this process.

    ``STYLEQUEUE_GPU_COUNT`` wins (containers without nvidia-smi, tests); otherwise the lines of
    ``nvidia-smi -L``; no nvidia-smi means no GPU.
    """
    override = os.environ.get(GPU_COUNT_ENV, "").strip()
    if override:
        try:
            return max(0, int(override))
        except ValueError:
            raise ConfigError(f"{GPU_COUNT_ENV} must be a whole number, got {override!r}") from None
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def parse_gpus(spec: str, available: int | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """GPU ids for ``--gpus``: ``auto``, a count ``N`` (the first N) or ids ``0,2``.

    ``auto`` means the GPUs this process may use: those ``CUDA_VISIBLE_DEVICES`` names when it is
    set (a container or scheduler may have picked them, possibly by UUID), else every GPU
    ``nvidia-smi`` lists (``available`` overrides the count). ``0`` means no GPU: one CPU worker.
    A single GPU id is written with a trailing comma: ``1,``.
    """
    env = os.environ if environ is None else environ
    spec = spec.strip().lower()
    if spec in ("auto", ""):
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return [str(i) for i in range(count_gpus() if available is None else available)]
    try:
        if "," in spec:
            ids = [int(part) for part in spec.split(",") if part.strip()]
        else:
            ids = list(range(int(spec)))
    except ValueError:
        raise ConfigError(
            f"--gpus must be 'auto', a count like 2, or ids like 0,1; got {spec!r}"
        ) from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus lists a negative or repeated GPU id: {spec!r}")
    return [str(i) for i in ids]


def _celery_argv(queue: str, hostname: str, concurrency: int, loglevel: str, pool: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", APP_MODULE, "worker",
        "-Q", queue,
        "-n", hostname,
        "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1",
        "--pool", pool,
        "--loglevel", loglevel,
    ]


def plan_workers(
    settings: Settings,
    gpus: list[str],
    *,
    queues: list[str] | None = None,
    concurrency_light: int = 2,
    loglevel: str = "INFO",
    batch: int | None = None,
) -> list[WorkerProcess]:
    """The worker processes to start: one per GPU (or one CPU worker) and the light worker.

    The GPU workers use the prefork pool with one child, not ``solo``: prefork enforces the soft
    and hard time limits and re-queues a job whose process dies, and CUDA is first touched in
    the child, after the fork. With ``batch`` N > 1 (default: ``settings.batch_max``) a GPU
    worker instead runs a threads pool of N task threads whose stylize steps share one GPU
    thread in batches (:mod:`stylequeue.worker.step`, which enforces the time limit itself).
    """
    batch = settings.batch_max if batch is None else batch
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    gpu_pool, gpu_concurrency = ("threads", batch) if batch > 1 else ("prefork", 1)
    gpu_env = {"STYLEQUEUE_BATCH_MAX": str(batch)}
    queues = queues or [settings.gpu_queue, settings.light_queue]
    unknown = set(queues) - {settings.gpu_queue, settings.light_queue}
    if unknown:
        raise ConfigError(
            f"unknown queue(s) {sorted(unknown)}; the queues are "
            f"{settings.gpu_queue!r} and {settings.light_queue!r}"
        )
    procs: list[WorkerProcess] = []
    if settings.gpu_queue in queues:
        if gpus:
            for position, gpu in enumerate(gpus):
                name = f"gpu{gpu if gpu.isdigit() else position}"  # a UUID would make a poor hostname
                argv = _celery_argv(settings.gpu_queue, f"{name}@%h", gpu_concurrency, loglevel, gpu_pool)
                procs.append(WorkerProcess(name, argv, {**gpu_env, "CUDA_VISIBLE_DEVICES": gpu}))
        else:
            # No GPU: hide any CUDA devices so "auto" resolves to the CPU in the child too.
            argv = _celery_argv(settings.gpu_queue, "cpu0@%h", gpu_concurrency, loglevel, gpu_pool)
            procs.append(WorkerProcess("cpu0", argv, {**gpu_env, "CUDA_VISIBLE_DEVICES": ""}))
    if settings.light_queue in queues and concurrency_light > 0:
        argv = _celery_argv(settings.light_queue, "light@%h", concurrency_light, loglevel, "prefork")
        procs.append(WorkerProcess("light", argv, {"CUDA_VISIBLE_DEVICES": ""}))
    if not procs:
        raise ConfigError("nothing to start: give --queues and a light concurrency above 0")
    return procs


class Supervisor:
    """Starts the children, forwards shutdown signals, and exits when they do."""

    def __init__(self, procs: list[WorkerProcess], env: dict[str, str] | None = None) -> None:
        self.procs = procs
        self.base_env = dict(os.environ if env is None else env)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False

    def start(self) -> None:
        for proc in self.procs:
            env = {**self.base_env, **proc.env}
            log.info("starting %s: %s", proc.name, " ".join(proc.argv))
            self.children[proc.name] = subprocess.Popen(proc.argv, env=env)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Warm shutdown for every child still running (Celery finishes the current job)."""
        self._stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(sig)

    def running(self) -> dict[str, bool]:
        """Each child's name -> whether it runs now (the worker metrics' process gauges)."""
        return {p.name: p.name in self.children and self.children[p.name].poll() is None for p in self.procs}

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d; asking the workers to finish their jobs and stop", signum)
        self.stop(signum)

    def wait(self) -> int:
        """Block until every child has exited; when one exits on its own, stop the others.

        A dead GPU worker takes the node out of service as a whole, so the orchestrator
        restarts it instead of leaving a GPU idle behind a live process.
        """
        exit_code = 0
        while any(child.poll() is None for child in self.children.values()):
            for name, child in self.children.items():
                code = child.poll()
                if code is not None and not self._stopping:
                    log.warning("worker %s exited with code %s; stopping the others", name, code)
                    exit_code = exit_code or code or 1
                    self.stop()
            time.sleep(0.2)
        codes = [child.returncode for child in self.children.values()]
        return exit_code or next((c for c in codes if c not in (0, None)), 0)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        return self.wait()


def run_workers(
    settings: Settings,
    *,
    gpus: str = "auto",
    queues: list[str] | None = None,
    concurrency_light: int = 2,
    loglevel: str = "INFO",
    batch: int | None = None,
) -> int:
    """Start the workers for this machine and wait for them; returns the exit code.

    With ``worker_metrics_port`` set, this process also serves the node's GPU and process
    metrics (worker/metrics.py) for as long as the workers run.
    """
    gpu_ids = parse_gpus(gpus)
    procs = plan_workers(
        settings, gpu_ids, queues=queues, concurrency_light=concurrency_light, loglevel=loglevel,
        batch=batch,
    )
    supervisor = Supervisor(procs)
    stop_metrics = serve_worker_metrics(settings, supervisor.running) if settings.worker_metrics_port else None
    try:
        return supervisor.run()
    finally:
        if stop_metrics is not None:
            stop_metrics()
