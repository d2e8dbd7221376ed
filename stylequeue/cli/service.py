"""The job-service subcommands: ``worker``, ``submit``, ``status``, ``cancel``, ``manifest``, ``beat``,
``recover``.

Each reads :class:`Settings` from the environment (``STYLEQUEUE_*``, ``STYLEQUEUE_CONFIG``), so a
producer's shell and a worker's container agree by configuration alone.

Exit codes beyond the package's (0 done, 1 OS error, 2 bad input): 3 the job FAILED or was
CANCELLED (``submit --wait``, ``manifest``), 4 ``--wait`` timed out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from stylequeue.exceptions import ConfigError, JobFailedError

EXIT_JOB_FAILED = 3
EXIT_TIMEOUT = 4


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_worker(subparsers)
    _register_submit(subparsers)
    p = subparsers.add_parser("status", help="show a submitted job's status and progress")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=status_command)
    p = subparsers.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=cancel_command)
    p = subparsers.add_parser("manifest", help="submit a YAML/JSON manifest of jobs and wait for them")
    p.add_argument("file", metavar="FILE", help="manifest path or s3:// / file:// URI")
    p.add_argument("--max-in-flight", type=int, help="jobs queued or running at once "
                   "(default: STYLEQUEUE_MANIFEST_MAX_IN_FLIGHT)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(handler=manifest_command)
    p = subparsers.add_parser("beat", help="run Celery beat: manifest pick-up, preview expiry, "
                              "lost-message recovery")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(handler=beat_command)
    p = subparsers.add_parser(
        "recover", help="re-send job messages the broker lost, once, now (beat does it periodically)",
        description="Sweeps the jobs that have not ended; a job whose next message has been on no "
        "queue for longer than STYLEQUEUE_RECOVER_AFTER_S gets it sent again (docs/reliability.md).",
    )
    p.set_defaults(handler=recover_command)


def _register_worker(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker", help="start Celery workers: one process per GPU (or one CPU worker)",
        description="One `celery worker` per GPU (CUDA_VISIBLE_DEVICES=i, one job at a time, "
        "hostname gpu<i>@host), or one CPU worker without GPUs, plus a light-queue worker. "
        "SIGTERM asks every worker to finish its job and stop.",
    )
    p.add_argument("--gpus", default="auto", help="auto, a count (0 = CPU only) or ids like 0,1")
    p.add_argument("--queues", help="comma-separated queues to serve (default: gpu and light)")
    p.add_argument("--concurrency-light", type=int, default=2,
                   help="processes for the light queue (0: no light worker; default 2)")
    p.add_argument("--batch", type=int, help="jobs a GPU worker optimises together "
                   "(threads pool; default STYLEQUEUE_BATCH_MAX, 1 = one job at a time)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(handler=worker_command)


def _register_submit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit", help="submit a style-transfer job to the service",
        description="Local files are uploaded to <storage_root>/inputs/<sha256>.<ext> first; "
        "s3:// and file:// URIs are used as they are.",
    )
    p.add_argument("content", metavar="CONTENT", help="content image: local path or URI")
    p.add_argument("styles", metavar="STYLE", nargs="+", help="style image(s): local paths or URIs")
    p.add_argument("--job-id", help="the job's id (default: generated); the same id runs once")
    p.add_argument("--preset", help="engine preset: seed, gatys or default")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting, e.g. size=512 or iterations=300 (repeatable; "
                   "values are read as JSON when they parse, else as text)")
    p.add_argument("--priority", type=int, help="0 (first) to 9 (last)")
    p.add_argument("--wait", action="store_true", help="wait for the job, showing progress")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=submit_command)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``["size=64", "original_colors=true", "lr=0.05"]`` -> typed values (JSON where it parses)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {pair!r} must look like KEY=VALUE, for example size=512")
        try:
            params[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[key.strip()] = raw
    return params


def input_uri(root: str, source: str) -> tuple[str, bytes | None]:
    """(URI, bytes to upload): a local file goes to ``<root>/inputs/<sha256>.<ext>`` (content
    addressed, so uploading it again is free); a URI passes through with nothing to upload."""
    if "://" in source:
        return source, None
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"input file {source} does not exist") from None
    return f"{root}/inputs/{hashlib.sha256(data).hexdigest()}{path.suffix.lower()}", data


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _emit(args: argparse.Namespace, obj: Any, line: str) -> None:
    """``obj`` as JSON with --json, else the one line a shell script wants."""
    if args.json:
        _print_json(obj)
    else:
        print(line)


def submit_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import submit
    from stylequeue.scheduler.jobs import parse_spec
    from stylequeue.settings import load_settings
    from stylequeue.storage import open_storage
    from stylequeue.tasks.app import make_app

    settings = load_settings()
    inputs = [input_uri(settings.resolved_storage_root, s) for s in [args.content, *args.styles]]
    spec: dict[str, Any] = {"content": inputs[0][0], "styles": [uri for uri, _ in inputs[1:]]}
    for key, value in (("job_id", args.job_id), ("preset", args.preset), ("priority", args.priority)):
        if value is not None:
            spec[key] = value
    params = parse_params(args.param)
    if params:
        spec["params"] = params
    parse_spec(spec, settings)  # a bad spec is refused before anything is uploaded or queued
    store = open_storage(settings)
    for uri, data in inputs:
        if data is not None and not store.exists(uri):
            store.put_bytes(uri, data)
    job = submit(spec, app=make_app(settings))
    if not args.wait:
        info = {"job_id": job.job_id, "status": job.status().value, "result_uri": job.result_uri}
        _emit(args, info, job.job_id)
        return 0
    return _wait(job, args)


def _wait(job: Any, args: argparse.Namespace) -> int:
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    show = sys.stderr.isatty()  # a progress line for people, not for logs and pipes
    while True:
        try:
            result = job.wait(timeout=1.0)
            break
        except TimeoutError:
            progress = job.progress()
            if show and progress:
                print(f"\r{job.job_id}: {_progress_line(progress)}", end="", file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() > deadline:
                print(f"stylequeue: job {job.job_id} not done after {args.timeout} s "
                      f"(still {job.status().value})", file=sys.stderr)
                return EXIT_TIMEOUT
        except JobFailedError as exc:
            if show:
                print(file=sys.stderr)
            if args.json:
                _print_json({"job_id": job.job_id, "status": exc.status, "error": str(exc)})
            else:
                print(f"stylequeue: {exc}", file=sys.stderr)
            return EXIT_JOB_FAILED
    if show:
        print(file=sys.stderr)
    _emit(args, result, str(result.get("result_uri")))
    return 0


def _progress_line(p: dict[str, Any]) -> str:
    loss = (p.get("losses") or {}).get("total")
    eta = p.get("eta_s")
    return (f"iteration {p.get('iteration')}/{p.get('total')}  scale {p.get('scale', 0) + 1}/"
            f"{p.get('num_scales', 1)}  loss {loss if loss is None else f'{loss:.4g}'}  "
            f"eta {'?' if eta is None else f'{eta:.0f}s'}")


def status_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import get_job

    job = get_job(args.job_id)
    status = job.status()
    info: dict[str, Any] = {"job_id": job.job_id, "status": status.value, "result_uri": job.result_uri,
                            "progress": job.progress(), "error": job.error(), "result": job.result()}
    if args.json:
        _print_json(info)
        return 0
    print(f"{job.job_id}: {status.value}")
    if info["progress"]:
        print(f"  {_progress_line(info['progress'])}")
    if info["error"]:
        print(f"  error: {info['error']}")
    if info["result"]:
        print(f"  result: {info['result'].get('result_uri')}")
    return 0


def cancel_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import get_job

    job = get_job(args.job_id)
    job.cancel()
    print(f"{job.job_id}: cancel requested (was {job.status().value})")
    return 0


def recover_command(args: argparse.Namespace) -> int:
    from stylequeue.tasks.app import app
    from stylequeue.tasks.recovery import recover

    print(json.dumps(recover(app), indent=2))
    return 0


def manifest_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import submit_manifest

    def done(handle: Any, status: Any) -> None:
        if not args.json:
            print(f"{handle.job_id}: {status.value}", flush=True)

    report = submit_manifest(args.file, max_in_flight=args.max_in_flight, on_done=done)
    if args.json:
        _print_json({"statuses": report.statuses, "errors": report.errors, "results": report.results})
    else:
        for job_id, error in report.errors.items():
            print(f"  {job_id}: {error}", file=sys.stderr)
    return 0 if report.ok else EXIT_JOB_FAILED


def worker_command(args: argparse.Namespace) -> int:
    from stylequeue.settings import load_settings
    from stylequeue.worker import run_workers

    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    return run_workers(load_settings(), gpus=args.gpus, queues=queues,
                       concurrency_light=args.concurrency_light, loglevel=args.loglevel,
                       batch=args.batch)


def beat_command(args: argparse.Namespace) -> int:
    from stylequeue.settings import load_settings

    settings = load_settings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "stylequeue.tasks.app", "beat",
            "--loglevel", args.loglevel,
            "--schedule", str(Path(settings.data_dir) / "celerybeat-schedule")]
    os.execv(sys.executable, argv)
    return 0  # not reached
