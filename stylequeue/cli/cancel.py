"""``stylequeue cancel JOB_ID``: ask a queued or running job to stop."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(handler=cancel_command)


def cancel_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import get_job

    job = get_job(args.job_id)
    job.cancel()
    print(f"{job.job_id}: cancel requested (was {job.status().value})")
    return 0
