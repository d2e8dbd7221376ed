"""``stylequeue worker``: one Celery worker per GPU (or one CPU worker) and a light-queue worker
(see :mod:`stylequeue.worker.launcher`).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker", help="start Celery workers: one process per GPU (or one CPU worker)",
        description="One `celery worker` per GPU (CUDA_VISIBLE_DEVICES=i, one job at a time, "
        "hostname gpu<i>@host), or one CPU worker without GPUs, plus a light-queue worker. "
        "SIGTERM asks every worker to finish its job and stop.",
    )
    p.add_argument("--gpus", default="auto", help="auto, a count (0 = CPU only) or ids like 0,1")
    p.add_argument("--queues", help="comma-separated queues to serve (default: gpu and light)")
    p.add_argument("--concurrency-light", type=int, default=2,
                   help="processes for the light queue (0: no light worker; default 2)")
    p.add_argument("--batch", type=int, help="jobs a GPU worker optimises together "
                   "(threads pool; default STYLEQUEUE_BATCH_MAX, 1 = one job at a time)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(handler=worker_command)


def worker_command(args: argparse.Namespace) -> int:
    from stylequeue.settings import load_settings
    from stylequeue.worker import run_workers

    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    return run_workers(load_settings(), gpus=args.gpus, queues=queues,
                       concurrency_light=args.concurrency_light, loglevel=args.loglevel,
                       batch=args.batch)
