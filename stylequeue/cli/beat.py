"""``stylequeue beat``: Celery beat with stylequeue's schedule (manifest pick-up, preview expiry,
lost-message recovery; the tasks are in :mod:`stylequeue.scheduler.beat`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("beat", help="run Celery beat: manifest pick-up, preview expiry, "
                              "lost-message recovery")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(handler=beat_command)


def beat_command(args: argparse.Namespace) -> int:
    from stylequeue.settings import load_settings

    settings = load_settings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "celery", "-A", "stylequeue.tasks.app", "beat",
            "--loglevel", args.loglevel,
            "--schedule", str(Path(settings.data_dir) / "celerybeat-schedule")]
    os.execv(sys.executable, argv)
    return 0  # not reached
