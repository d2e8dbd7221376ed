"""Real ``celery worker`` processes for the service tests.

A :class:`CeleryWorker` is a subprocess running exactly what a deployment runs
(``celery -A stylequeue.tasks.app worker -Q <queue>``) with the test's ``STYLEQUEUE_*``
environment. Its log goes to a file that :meth:`CeleryWorker.log_text` returns, so a failing test
can show what the worker did. Stop is SIGTERM (Celery's warm shutdown), then SIGKILL if it hangs.
The repository root is on its ``PYTHONPATH``, so ``extra_args=["--include", "testbed.poison"]``
loads a harness plugin however the tests or benchmarks were started.

:class:`Beat` runs ``stylequeue beat``; :func:`start_stylequeue` / :func:`stop_process` any other
``stylequeue`` command (``worker``, the launcher; ``flower``) the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Mapping

APP = "stylequeue.tasks.app"
# Where testbed/ lives: python -m puts only the cwd on a subprocess's path, which need not be it.
ROOT = Path(__file__).resolve().parents[1]


class CeleryWorker:
    """One ``celery worker`` subprocess consuming ``queue``."""

    def __init__(
        self,
        env: Mapping[str, str],
        queue: str,
        *,
        name: str | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        extra_args: list[str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        self.queue = queue
        self.hostname = f"{name or queue}-{uuid.uuid4().hex[:6]}@test"
        self.concurrency = concurrency
        self.pool = pool
        self.extra_args = extra_args or []
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkstemp(prefix=f"stylequeue-worker-{queue}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", APP, "worker",
            "-Q", self.queue, "-n", self.hostname,
            "--concurrency", str(self.concurrency), "--pool", self.pool,
            "--prefetch-multiplier", "1", "--loglevel", "INFO", "--without-mingle",
            "--without-gossip", *self.extra_args,
        ]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "CeleryWorker":
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting (start several, then wait for each)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self._ready_marks = self.log_text().count(" ready.")

    def wait_ready(self) -> "CeleryWorker":
        """Block until this start's " ready." line is in the log (Celery's own signal)."""
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.hostname} exited at start\n{self.log_text()[-4000:]}")
            if self.log_text().count(" ready.") > self._ready_marks:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"worker {self.hostname} not ready after {self.startup_timeout}s\n"
                           f"{self.log_text()[-4000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL after ``timeout`` seconds."""
        if self.proc is None:
            return None
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def terminate(self) -> None:
        """Send SIGTERM without waiting (stop several at once, then ``stop()`` each)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def __enter__(self) -> "CeleryWorker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_all(workers: list[CeleryWorker]) -> None:
    """Start several workers in parallel (each spends seconds importing torch)."""
    for worker in workers:
        worker.launch()
    try:
        for worker in workers:
            worker.wait_ready()
    except Exception:
        stop_all(workers)
        raise


def stop_all(workers: list[CeleryWorker], timeout: float = 30.0) -> None:
    """Warm-stop several workers at once."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop(timeout)


class Beat:
    """``stylequeue beat`` (Celery beat with the service's schedule) as a subprocess.

    ``data_dir`` holds beat's schedule file; ``env`` may shorten the periods
    (``STYLEQUEUE_RECOVER_EVERY_S``, ``STYLEQUEUE_SCAN_MANIFESTS_EVERY_S``).
    """

    def __init__(self, env: Mapping[str, str], data_dir: Path) -> None:
        self.env = {**os.environ, **env, "STYLEQUEUE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
        self.log_path = Path(tempfile.mkstemp(prefix="stylequeue-beat-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "Beat":
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "stylequeue", "beat"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def __enter__(self) -> "Beat":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_stylequeue(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m stylequeue <argv>`` as a subprocess with exactly ``env``, its output in ``log``."""
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "stylequeue", *argv], env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM (a warm shutdown for Celery's processes), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
