"""``stylequeue manifest FILE``: submit a YAML/JSON manifest of jobs, a few in flight at a time,
and wait for them all (exit 3 when any failed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stylequeue.cli import EXIT_JOB_FAILED, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("manifest", help="submit a YAML/JSON manifest of jobs and wait for them")
    p.add_argument("file", metavar="FILE", help="manifest path or s3:// / file:// URI")
    p.add_argument("--max-in-flight", type=int, help="jobs queued or running at once "
                   "(default: STYLEQUEUE_MANIFEST_MAX_IN_FLIGHT)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(handler=manifest_command)


def manifest_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import submit_manifest

    def done(handle: Any, status: Any) -> None:
        if not args.json:
            print(f"{handle.job_id}: {status.value}", flush=True)

    report = submit_manifest(args.file, max_in_flight=args.max_in_flight, on_done=done)
    if args.json:
        print_json({"statuses": report.statuses, "errors": report.errors, "results": report.results})
    else:
        for job_id, error in report.errors.items():
            print(f"  {job_id}: {error}", file=sys.stderr)
    return 0 if report.ok else EXIT_JOB_FAILED
