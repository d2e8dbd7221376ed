"""``stylequeue worker``: start Celery workers made for GPU nodes (see :mod:`.launcher`)."""

from stylequeue.worker.launcher import count_gpus, parse_gpus, plan_workers, run_workers

__all__ = ["count_gpus", "parse_gpus", "plan_workers", "run_workers"]
