"""``stylequeue demo CONTENT STYLE -o OUT``: one job through the whole job service, on this machine.

What ``scripts/demo.sh`` runs (its ``--local`` runs ``stylequeue run`` instead): the job travels
as in a deployment (a worker process, a broker, a producer, storage), with no server to install
and nothing left running afterwards.

1. A private service under ``--data-dir`` (default ``<OUT's folder>/.stylequeue-demo``): the
   zero-server defaults (filesystem broker, file results, ``file://`` storage) forced there
   whatever the environment points at, so the demo never mixes with a real queue. A lock keeps a
   second demo out of the folder, and its broker folders are emptied first, so no message of an
   interrupted run is picked up.
2. ``stylequeue worker`` as a child in a session of its own (one CPU worker, or one per GPU, plus
   a light worker), its log in the data dir.
3. The job sent as ``stylequeue submit`` sends it (:func:`~stylequeue.cli.submit.submit_files`:
   local files uploaded, then ``stylequeue.scheduler.submit``), while the worker boots; the worker
   is ready when each of its processes answers a ping (kombu's filesystem transport carries
   remote control through its control folder).
4. A progress bar fed by ``JobHandle.progress()``; then the result and its metadata copied to OUT
   and ``OUT.json``, and the lines ``stylequeue status`` prints.
5. The worker stopped in every case (done, failed, an error, Ctrl-C, SIGTERM, SIGHUP): an
   unfinished job is cancelled, SIGTERM asks for Celery's warm shutdown, and whatever is left of
   the worker's process group after that is killed. On Linux the worker also gets SIGTERM when
   this process dies without cleaning up (``PR_SET_PDEATHSIG``: ``kill -9``, a CI timeout).

Engine options are ``stylequeue run``'s and become the job's params; ``--device``,
``--progress-every`` and ``--weights``, which a job does not choose, become the worker's settings.
Exit codes as in :mod:`stylequeue.cli`: 3 the job failed (its error printed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from stylequeue.cli import EXIT_JOB_FAILED
from stylequeue.cli.run import (ProgressBar, SignalScope, add_picture_options, engine_overrides, metadata_path,
                                warn_random_weights)
from stylequeue.exceptions import JobFailedError, StyleQueueError

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.scheduler import JobHandle
    from stylequeue.settings import Settings

DEMO_DIR = ".stylequeue-demo"
# Settings that would point the demo at servers: emptied, so the zero-server defaults apply.
EMBEDDED_DEFAULTS = ("BROKER_URL", "RESULT_BACKEND", "STORAGE_ROOT", "ALLOWED_PREFIXES")
STARTUP_TIMEOUT_S = 180.0  # a cold first start imports Celery, and the first job torch
STOP_TIMEOUT_S = 60.0  # a cancelled job stops within a second; Celery's warm shutdown takes a few
POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run one job through a private job service on this machine (scripts/demo.sh)",
        description="Start a worker on the zero-server defaults under DATA_DIR, submit one job through "
        "stylequeue.scheduler, show its progress, copy its result to OUT and OUT.json, stop the worker.",
    )
    add_picture_options(p, "engine options: the job's params (--device and --progress-every: the worker's settings)")
    p.add_argument("--weights", help="the worker's weights: imagenet, a file, s3://... or random[:SEED] "
                   "(default: settings, STYLEQUEUE_WEIGHTS)")
    p.add_argument("--data-dir", help=f"the private service's folder (default: OUT's folder/{DEMO_DIR})")
    p.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    """Steps 1 to 5 of the module docstring."""
    from stylequeue.cli.submit import submit_files
    from stylequeue.engine.images import format_for_path
    from stylequeue.settings import load_settings
    from stylequeue.tasks.app import make_app

    out = Path(args.output)
    format_for_path(out)  # an unknown extension fails now, not after the job
    params = engine_overrides(args)
    worker_settings = {"DEVICE": params.pop("device", None), "PROGRESS_EVERY": params.pop("progress_every", None),
                       "WEIGHTS": args.weights}
    data_dir = Path(args.data_dir or out.parent / DEMO_DIR).resolve()
    env = service_env(data_dir, worker_settings)
    fields: dict[str, Any] = {"job_id": f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}",
                              "params": params, "output_format": out.suffix.lower().lstrip(".").replace("jpeg", "jpg")}
    if args.preset:
        fields["preset"] = args.preset
    with exclusive(data_dir), SignalScope(_interrupt, (signal.SIGTERM, signal.SIGHUP)):
        shutil.rmtree(data_dir / "broker", ignore_errors=True)
        settings = load_settings(environ=env)
        gpus = "0" if settings.device == "cpu" else "auto"
        say(f"a private job service in {data_dir} (filesystem broker, file:// storage)")
        worker = DemoWorker(env, data_dir / "worker.log", gpus)
        job: JobHandle | None = None
        try:
            app = make_app(settings)
            job = submit_files(app, args.content, args.styles, fields)
            say(f"submitted job {job.job_id} through stylequeue.scheduler.submit")
            workers = worker.wait_ready(app, expected_workers(settings, gpus))
            say(f"worker ready: {', '.join(workers)} (log: {worker.log_path})")
            result = follow(job, worker)
        except JobFailedError as exc:
            print(f"stylequeue: {exc}", file=sys.stderr)
            return EXIT_JOB_FAILED
        except BaseException:
            if job is not None and not job.status().is_finished:
                say(f"cancelling job {job.job_id}")
                job.cancel()  # so the worker's warm shutdown need not wait for the optimisation
            raise
        finally:
            worker.stop()
    return report(job, result, out, settings)


def service_env(data_dir: Path, worker_settings: dict[str, Any]) -> dict[str, str]:
    """This process's environment with the demo's service settings (the worker inherits them)."""
    env = {**os.environ, "STYLEQUEUE_DATA_DIR": str(data_dir)}
    env.update({f"STYLEQUEUE_{name}": "" for name in EMBEDDED_DEFAULTS})
    env.update({f"STYLEQUEUE_{name}": str(value) for name, value in worker_settings.items() if value is not None})
    return env


def expected_workers(settings: "Settings", gpus: str) -> int:
    """How many celery workers ``stylequeue worker --gpus GPUS --concurrency-light 1`` starts."""
    from stylequeue.worker import parse_gpus, plan_workers

    return len(plan_workers(settings, parse_gpus(gpus), concurrency_light=1))


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock: a second demo there would empty the first one's broker."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "demo.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StyleQueueError(f"another `stylequeue demo` is running in {data_dir}; wait for it to end "
                                  "or give this one another --data-dir") from None
        yield


def say(text: str) -> None:
    """The demo's own narration, on stderr beside the progress bar (stdout has the results)."""
    print(f"stylequeue demo: {text}", file=sys.stderr, flush=True)


def _interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM and SIGHUP end the demo as Ctrl-C does: through the ``finally`` that stops the worker."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it when the demo dies without cleaning up (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class DemoWorker:
    """``stylequeue worker`` as a child of the demo: in a session (and process group) of its own,
    so Ctrl-C reaches the demo alone and the demo decides how the worker stops."""

    def __init__(self, env: dict[str, str], log_path: Path, gpus: str) -> None:
        self.log_path = log_path
        argv = [sys.executable, "-m", "stylequeue", "worker", "--gpus", gpus, "--concurrency-light", "1"]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.started = time.monotonic()

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise StyleQueueError(f"the demo's worker exited (code {code}); the end of its log "
                                  f"{self.log_path}:\n{tail}")

    def wait_ready(self, app: "Celery", expected: int, timeout: float = STARTUP_TIMEOUT_S) -> list[str]:
        """The hostnames of the worker's processes once all ``expected`` answer a ping."""
        seen: set[str] = set()
        while len(seen) < expected:
            self.check_alive()
            if time.monotonic() - self.started > timeout:
                raise StyleQueueError(f"the demo's worker did not answer a ping within {timeout:.0f} s "
                                      f"(answered: {sorted(seen) or 'none'}); see its log {self.log_path}")
            for reply in app.control.ping(timeout=POLL_S):
                seen.update(reply)
        return sorted(seen)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM); then SIGKILL to whatever is left of the group: after
        STOP_TIMEOUT_S, at once on a second Ctrl-C, and always for processes that outlived the
        launcher (none, when Celery stops as it should)."""
        began = time.monotonic()
        if self.proc.poll() is None:
            say("stopping the worker")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            say(f"worker stopped ({time.monotonic() - began:.1f} s); nothing of it is left running")
        else:
            say(f"killed what was left of the worker (see {self.log_path})")
        self.proc.wait()


def follow(job: "JobHandle", worker: DemoWorker) -> dict[str, Any]:
    """Wait for the job, drawing ``job.progress()`` as a bar; the worker's exit ends the wait."""
    from stylequeue.job import JobStatus

    iteration, total, postfix = 0, None, {}
    with ProgressBar(None, desc=job.job_id) as bar:
        while not (status := job.status()).is_finished:
            worker.check_alive()
            progress = job.progress()
            if progress:
                iteration, total, postfix = progress["iteration"], progress["total"], _postfix(progress)
            bar.show(iteration, total, postfix, desc=f"{job.job_id} {status.value}")
            time.sleep(POLL_S)
        if status is JobStatus.SUCCEEDED and total:
            iteration = total  # the last report is overwritten by the step's SUCCESS; every step ran
        bar.show(iteration, total, postfix, desc=f"{job.job_id} {status.value}")
    return job.wait(timeout=0)  # the result, or JobFailedError with the job's error


def _postfix(progress: dict[str, Any]) -> dict[str, str]:
    loss = (progress.get("losses") or {}).get("total")
    postfix = {"loss": "?" if loss is None else f"{loss:.4g}"}
    if progress.get("num_scales", 1) > 1:
        postfix["scale"] = f"{progress['scale'] + 1}/{progress['num_scales']}"
    if progress.get("tiles_total"):
        postfix["tiles"] = f"{progress['tiles_done']}/{progress['tiles_total']}"
    postfix["size"] = f"{progress['width']}x{progress['height']}"
    return postfix


def report(job: "JobHandle", result: dict[str, Any], out: Path, settings: "Settings") -> int:
    """Copy the result and its metadata to OUT and OUT.json; print where they are and the job's status."""
    from stylequeue.cli.status import status_info, status_lines
    from stylequeue.fileio import atomic_write_bytes
    from stylequeue.storage import open_storage
    from stylequeue.storage.uri import parse_uri

    store = open_storage(settings)
    atomic_write_bytes(out, store.get_bytes(result["result_uri"]))
    atomic_write_bytes(metadata_path(out), store.get_bytes(result["metadata_uri"]))
    print("\n".join(status_lines(status_info(job, flower=False))))
    print(f"result:   {parse_uri(result['result_uri']).path}")
    print(f"metadata: {parse_uri(result['metadata_uri']).path}")
    print(f"copied to {out} and {metadata_path(out)}")
    if result.get("random_weights"):
        warn_random_weights()
    return 0
