"""``stylequeue flower``: Flower for the stylequeue app, with basic auth required.

Auth comes from ``STYLEQUEUE_FLOWER_BASIC_AUTH`` (or the config file), never from the command
line, where every user of the machine could read it in ``ps``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "flower",
        help="run Flower (task monitoring) with basic auth",
        description="Run Flower on the stylequeue Celery app. Basic auth is required: set "
        "STYLEQUEUE_FLOWER_BASIC_AUTH=user:password. Flower's /metrics is served without auth, "
        "so keep the port network-restricted (docs/monitoring.md). Arguments after -- go to "
        "Flower unchanged (for example -- --url_prefix=flower).",
    )
    p.add_argument("--port", type=int, help="port (default: settings flower_port)")
    p.add_argument("--address", help="address to bind (default: settings flower_address)")
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=flower_command)


def flower_command(args: argparse.Namespace) -> int:
    from stylequeue.monitoring.flower import run_flower
    from stylequeue.settings import load_settings

    settings = load_settings({"flower_port": args.port, "flower_address": args.address})
    extra = [a for a in args.flower_args if a != "--"]
    return run_flower(settings, extra)
