"""``stylequeue jobs``: the job history, newest first: a table, or JSON with ``--json``.

```
stylequeue jobs [--status failed] [--since 1h] [--limit 50] [--cursor C] [--json]
```

The same records as ``stylequeue.scheduler.list_jobs``; when more remain, the cursor of the next
page is printed last (``next_cursor`` with ``--json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import Any

from stylequeue.cli import print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="list past and present jobs (the job history)")
    p.add_argument("--status", help="only jobs in this status: queued, running, succeeded, failed, cancelled, "
                   "timed_out")
    p.add_argument("--since", help="only jobs submitted since: 90s, 15m, 1h, 2d ago, or an ISO time")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    p.add_argument("--json", action="store_true", help="print one JSON object: jobs and next_cursor")
    p.set_defaults(handler=jobs_command)


def jobs_command(args: argparse.Namespace) -> int:
    from stylequeue.scheduler import list_jobs

    records, cursor = list_jobs(args.status, args.since, args.limit, args.cursor)
    if args.json:
        print_json({"jobs": records, "next_cursor": cursor})
        return 0
    rows = [("JOB ID", "STATUS", "SUBMITTED", "TOOK", "WORKER", "RESULT / ERROR")]
    rows += [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if cursor:
        print(f"more: --cursor {cursor}", file=sys.stderr)
    return 0


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _row(record: dict[str, Any]) -> tuple[str, ...]:
    ended = record.get("ended_at")
    took = (ended or time.time()) - record["submitted_at"]
    outcome = record.get("error") if record["status"] != "succeeded" else record.get("result_uri")
    return (record["job_id"], record["status"], _when(record["submitted_at"]), f"{took:.1f}s",
            record.get("worker") or "-", (outcome or "")[:100])


def history_line(record: dict[str, Any]) -> str:
    """A job's times and its last webhook delivery in one line (``stylequeue status``)."""
    times = ", ".join(f"{name} {_when(record.get(f'{name}_at'))}" for name in ("submitted", "started", "ended")
                      if record.get(f"{name}_at"))
    delivery = record.get("delivery")
    if not delivery:
        return times
    answer = f"HTTP {delivery['http_status']}" if delivery.get("http_status") else delivery.get("error")
    state = "delivered" if delivery.get("delivered") else ("given up" if delivery.get("final") else "retrying")
    return (f"{times}; webhook {delivery['event']} {state} ({answer}, {delivery['attempts']} attempt"
            f"{'s' if delivery['attempts'] != 1 else ''}, id {delivery['id']})")
