"""``stylequeue recover``: one lost-message sweep now (beat runs it periodically)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recover", help="re-send job messages the broker lost, once, now (beat does it periodically)",
        description="Sweeps the jobs that have not ended; a job whose next message has been on no "
        "queue for longer than STYLEQUEUE_RECOVER_AFTER_S gets it sent again (docs/reliability.md).",
    )
    p.set_defaults(handler=recover_command)


def recover_command(args: argparse.Namespace) -> int:
    from stylequeue.tasks.app import app
    from stylequeue.scheduler.recovery import recover

    print(json.dumps(recover(app), indent=2))
    return 0
