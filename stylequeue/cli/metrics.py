"""``stylequeue metrics``: serve the broker's queue lengths to Prometheus (and autoscalers)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "metrics",
        help="serve queue lengths as Prometheus metrics (for KEDA / autoscaling)",
        description="Serve /metrics with stylequeue_queue_length{queue}, per-priority lengths "
        "and unacknowledged (running) jobs, read from the Redis broker on every scrape. The "
        "endpoint has no auth: bind it to a restricted network.",
    )
    p.add_argument("--port", type=int, help="port (default: settings metrics_port)")
    p.add_argument("--address", help="address to bind (default: settings metrics_address)")
    p.set_defaults(handler=metrics_command)


def metrics_command(args: argparse.Namespace) -> int:
    from stylequeue.monitoring.queues import serve_metrics
    from stylequeue.settings import load_settings

    settings = load_settings({"metrics_port": args.port, "metrics_address": args.address})
    serve_metrics(settings)
    return 0
