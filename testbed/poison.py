"""A poison job, as a worker plugin: ``celery worker --include testbed.poison``.

The stylize task of the job whose id is in ``STYLEQUEUE_TEST_CRASH_ON`` SIGKILLs its own process,
the way a poison input that crashes a driver would; every other task runs as usual, and without
the variable the plugin does nothing. It lives in the harness because production code carries no
test hooks (the fault tests use it to show that such a job is failed after ``max_deliveries``).

Why the kill is not in the ``task_prerun`` handler itself: Celery sends ``task_prerun`` before it
calls the task, and :class:`stylequeue.tasks.base.JobTask` counts the delivery in ``__call__``. A
process killed at prerun would never be counted, and the job would be redelivered for ever. So the
handler wraps the task's ``run``, which ``Task.__call__`` calls after that count, once per process.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

from celery.signals import task_prerun

from stylequeue.tasks.app import TASK_STYLIZE

CRASH_ENV = "STYLEQUEUE_TEST_CRASH_ON"


def is_poison(args: tuple[Any, ...]) -> bool:
    """True when the task's first argument is the message (a dict) of the job named in CRASH_ENV."""
    job_id = os.environ.get(CRASH_ENV)
    message = args[0] if args else None
    return bool(job_id) and isinstance(message, dict) and message.get("job_id") == job_id


def _killing(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run``, except that it SIGKILLs this process first when given the poison job's message."""
    def run_or_die(*args: Any, **kwargs: Any) -> Any:
        if is_poison(args):
            os.kill(os.getpid(), signal.SIGKILL)
        return run(*args, **kwargs)

    run_or_die.poison = True  # type: ignore[attr-defined]
    return run_or_die


@task_prerun.connect
def arm(sender: Any = None, **_: Any) -> None:
    """``task_prerun`` receiver: make the stylize task's body kill the poison job's process."""
    if sender is None or sender.name != TASK_STYLIZE or getattr(sender.run, "poison", False):
        return
    sender.run = _killing(sender.run)

