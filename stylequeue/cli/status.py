"""``stylequeue status JOB_ID``: a submitted job's status, progress, error and result."""

from __future__ import annotations

import argparse
from typing import Any

from stylequeue.cli import print_json, progress_line
from stylequeue.cli.jobs import history_line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show a submitted job's status and progress")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    from stylequeue.monitoring.flower import job_task_url
    from stylequeue.scheduler import get_job

    job = get_job(args.job_id)
    status = job.status()
    info: dict[str, Any] = {"job_id": job.job_id, "status": status.value, "result_uri": job.result_uri,
                            "progress": job.progress(), "error": job.error(), "result": job.result(),
                            "flower_url": job_task_url(job), "history": job.history()}
    if args.json:
        print_json(info)
        return 0
    print(f"{job.job_id}: {status.value}")
    print(f"  flower: {info['flower_url']}")
    if info["progress"]:
        print(f"  {progress_line(info['progress'])}")
    if info["error"]:
        print(f"  error: {info['error']}")
    if info["result"]:
        print(f"  result: {info['result'].get('result_uri')}")
    if info["history"]:
        print(f"  history: {history_line(info['history'])}")
    return 0
