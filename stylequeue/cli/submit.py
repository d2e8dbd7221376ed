"""``stylequeue submit CONTENT STYLE [STYLE ...]``: send a job to the service, optionally waiting.

Local files are uploaded first (content-addressed under ``<storage_root>/inputs/``); the job spec
is validated before anything is uploaded or queued. Exit codes: 3 the job failed or was cancelled,
4 ``--wait`` timed out (see :mod:`stylequeue.cli`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylequeue.cli import EXIT_JOB_FAILED, EXIT_TIMEOUT, emit, print_json, progress_line
from stylequeue.exceptions import ConfigError, JobFailedError

if TYPE_CHECKING:
    from celery import Celery

    from stylequeue.scheduler import JobHandle


def register(subparsers: argparse._SubParsersAction) -> None:
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


def submit_files(app: "Celery", content: str, styles: list[str], fields: dict[str, Any]) -> "JobHandle":
    """Submit a job whose inputs may be local files (uploaded first, see :func:`input_uri`);
    ``fields`` are the spec's other fields. ``submit`` and ``demo`` both send jobs this way."""
    from stylequeue.scheduler import submit
    from stylequeue.scheduler.jobs import parse_spec
    from stylequeue.storage import open_storage
    from stylequeue.tasks.app import settings_of

    settings = settings_of(app)
    inputs = [input_uri(settings.resolved_storage_root, s) for s in [content, *styles]]
    spec: dict[str, Any] = {"content": inputs[0][0], "styles": [uri for uri, _ in inputs[1:]], **fields}
    parse_spec(spec, settings)  # a bad spec is refused before anything is uploaded or queued
    store = open_storage(settings)
    for uri, data in inputs:
        if data is not None and not store.exists(uri):
            store.put_bytes(uri, data)
    return submit(spec, app=app)


def submit_command(args: argparse.Namespace) -> int:
    from stylequeue.tasks.app import make_app

    fields: dict[str, Any] = {}
    for key, value in (("job_id", args.job_id), ("preset", args.preset), ("priority", args.priority)):
        if value is not None:
            fields[key] = value
    params = parse_params(args.param)
    if params:
        fields["params"] = params
    job = submit_files(make_app(), args.content, args.styles, fields)
    if not args.wait:
        info = {"job_id": job.job_id, "status": job.status().value, "result_uri": job.result_uri}
        emit(args, info, job.job_id)
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
                print(f"\r{job.job_id}: {progress_line(progress)}", end="", file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() > deadline:
                print(f"stylequeue: job {job.job_id} not done after {args.timeout} s "
                      f"(still {job.status().value})", file=sys.stderr)
                return EXIT_TIMEOUT
        except JobFailedError as exc:
            if show:
                print(file=sys.stderr)
            if args.json:
                print_json({"job_id": job.job_id, "status": exc.status, "error": str(exc)})
            else:
                print(f"stylequeue: {exc}", file=sys.stderr)
            return EXIT_JOB_FAILED
    if show:
        print(file=sys.stderr)
    emit(args, result, str(result.get("result_uri")))
    return 0
