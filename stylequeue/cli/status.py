"""``stylequeue status JOB_ID``: a submitted job's status, progress, error, result, history and the
Flower link of its running task."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stylequeue.cli import print_json, progress_line
from stylequeue.cli.jobs import history_line

if TYPE_CHECKING:
    from stylequeue.scheduler import JobHandle


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show a submitted job's status and progress")
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import get_job

    info = status_info(get_job(args.job_id))
    if args.json:
        print_json(info)
        return 0
    print("\n".join(status_lines(info)))
    return 0


def status_info(job: "JobHandle", *, flower: bool = True) -> dict[str, Any]:
    """What ``status --json`` prints: the job's status, progress, error, result and history, and
    with ``flower`` the Flower link of its running task (a deployment's; the demo runs no Flower)."""
    info = {"job_id": job.job_id, "status": job.status().value, "result_uri": job.result_uri,
            "progress": job.progress(), "error": job.error(), "result": job.result(), "history": job.history()}
    if flower:
        from stylequeue.monitoring.flower import job_task_url

        info["flower_url"] = job_task_url(job)
    return info


def status_lines(info: dict[str, Any]) -> list[str]:
    """``<job_id>: <status>`` and an indented line each for the Flower link, progress, error, result
    and history (``stylequeue demo`` ends with these too)."""
    lines = [f"{info['job_id']}: {info['status']}"]
    if info.get("flower_url"):
        lines.append(f"  flower: {info['flower_url']}")
    if info["progress"]:
        lines.append(f"  {progress_line(info['progress'])}")
    if info["error"]:
        lines.append(f"  error: {info['error']}")
    if info["result"]:
        lines.append(f"  result: {info['result'].get('result_uri')}")
    if info.get("history"):
        lines.append(f"  history: {history_line(info['history'])}")
    return lines
