"""Remember every job task message as it is sent, so a message the broker loses can be re-sent.

kombu's Redis transport has a window in which a message lives only in a worker's memory: BRPOP
has taken it off the list, and the write to the ``unacked`` hash has not happened yet (or the
reply sits unread in the socket). A broker restart in that window drops the message, and nothing
in Celery sends it again. :class:`RecordingAMQP` keeps, next to the job's other control keys, what
it takes to send each job message again (task name, arguments, chain, chord, ids); the recovery
sweep (:mod:`stylequeue.scheduler.recovery`) re-sends it when the message has been on no queue for
longer than the recovery grace.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from celery.app.amqp import AMQP
from kombu.utils.objects import cached_property

from stylequeue.tasks.control import JobControl

log = logging.getLogger(__name__)

def message_record(name: str, message: Any, options: dict[str, Any]) -> dict[str, Any]:
    """What :func:`resend` needs, from Celery's protocol-2 ``task_message`` (JSON-safe)."""
    headers, properties, body, _ = message
    args, kwargs, embed = body
    hard, soft = headers.get("timelimit") or (None, None)
    return {
        "name": name,
        "args": list(args),
        "kwargs": dict(kwargs),
        "task_id": headers["id"],
        "retries": headers.get("retries") or 0,
        "group_id": headers.get("group"),
        "group_index": headers.get("group_index"),
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "time_limit": hard,
        "soft_time_limit": soft,
        "priority": options.get("priority", properties.get("priority")),
        "chain": embed.get("chain"),
        "chord": embed.get("chord"),
        "link": embed.get("callbacks"),
        "link_error": embed.get("errbacks"),
    }


def resend(app: Any, record: dict[str, Any], headers: dict[str, Any] | None = None) -> None:
    """Send a remembered message again: same task id, arguments, chain and chord membership."""
    options = {k: v for k, v in record.items() if k not in ("name", "args", "kwargs") and v is not None}
    app.send_task(record["name"], args=record["args"], kwargs=record["kwargs"],
                  headers=headers or {}, **options)


class RecordingAMQP(AMQP):
    """Celery's AMQP helper, with every job task message remembered before it is published."""

    @cached_property
    def send_task_message(self) -> Callable[..., Any]:
        send = self._create_task_sender()

        def send_and_remember(producer: Any, name: str, message: Any, **options: Any) -> Any:
            if name in getattr(self.app, "stylequeue_recorded_tasks", ()):
                try:
                    JobControl(self.app).remember_message(message[0]["id"], message_record(name, message, options))
                except Exception as exc:  # noqa: BLE001 - the backend is down: still publish the job
                    log.warning("cannot remember message %s for recovery (%s)", message[0].get("id"), exc)
            return send(producer, name, message, **options)

        return send_and_remember
