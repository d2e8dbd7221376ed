"""How kombu's Redis transport lays out a queue in Redis, and a consistent look at all of it.

kombu keeps one Redis list per (queue, priority step): step 0 is the bare queue name, any other
step is ``<queue><sep><step>`` (``kombu.transport.redis.Channel._q_for_pri``; ``sep`` is
``"\\x06\\x16"`` unless the app's ``broker_transport_options`` change it). A message a worker has
taken but not acknowledged sits in the ``unacked`` hash as ``[message, exchange, routing_key]``
(``QoS.append``). The queue exporter (:mod:`stylequeue.monitoring.queues`) counts these keys; the
recovery sweep (:mod:`stylequeue.scheduler.recovery`) looks for task ids in them.

:func:`is_redis_broker` is the one answer to "is this broker Redis?" (the app's transport options
and both readers ask it), and :func:`broker_redis` reaches that Redis the way kombu does, so a
``sentinel://`` or ``rediss://`` broker is read through the same master and TLS as the workers use.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from stylequeue.exceptions import ConfigError

# kombu.transport.redis defaults, repeated here so the pure functions need no kombu channel.
KOMBU_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
KOMBU_UNACKED_KEY = "unacked"
# kombu's Redis transports: plain, TLS, and Sentinel-managed (``redis+socket://`` is plain Redis).
REDIS_TRANSPORTS = frozenset({"redis", "rediss", "sentinel"})
# How long a reader of the broker (exporter scrape, recovery sweep) waits for Redis.
READ_TIMEOUT_S = 5


@dataclass(frozen=True)
class QueueKeys:
    """How kombu names the Redis keys of a queue, as configured on the Celery app."""

    sep: str = KOMBU_SEP
    priority_steps: tuple[int, ...] = KOMBU_PRIORITY_STEPS
    unacked_key: str = KOMBU_UNACKED_KEY
    # kombu prepends ``global_keyprefix`` to every key it writes.
    prefix: str = ""

    def list_key(self, queue: str, step: int) -> str:
        """The Redis list that holds ``queue``'s messages at priority ``step``."""
        name = queue if step == 0 else f"{queue}{self.sep}{step}"
        return self.prefix + name

    @property
    def unacked(self) -> str:
        return self.prefix + self.unacked_key


def queue_keys(broker_transport_options: Mapping[str, Any] | None) -> QueueKeys:
    """Read kombu's key layout from a Celery app's ``broker_transport_options``."""
    opts = dict(broker_transport_options or {})
    steps = tuple(sorted(int(s) for s in opts.get("priority_steps", KOMBU_PRIORITY_STEPS)))
    return QueueKeys(
        sep=str(opts.get("sep", KOMBU_SEP)),
        priority_steps=steps,
        unacked_key=str(opts.get("unacked_key", KOMBU_UNACKED_KEY)),
        prefix=str(opts.get("global_keyprefix", "")),
    )


def is_redis_broker(url: str) -> bool:
    """Does kombu reach this broker URL through one of its Redis transports?"""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    return scheme.split("+", 1)[0] in REDIS_TRANSPORTS


def require_redis_broker(url: str, what: str) -> None:
    """ConfigError, saying how to fix it, when ``what`` needs a Redis broker and ``url`` is not one."""
    if not is_redis_broker(url):
        raise ConfigError(
            f"{what} reads a Redis broker, but the broker is {url!r}; "
            "set STYLEQUEUE_BROKER_URL=redis://HOST:6379/0 (or a sentinel:// URL)"
        )


@contextmanager
def broker_redis(url: str, transport_options: Mapping[str, Any] | None, what: str) -> Iterator[Any]:
    """A redis-py client on the broker's Redis, connected as kombu connects (URL, Sentinel master,
    TLS, credentials), with short timeouts; ConfigError naming ``what`` when the broker is not Redis.

    The client is plain (no kombu key prefixing): callers add ``QueueKeys.prefix`` themselves.
    """
    require_redis_broker(url, what)
    import kombu
    import redis

    options = {**(transport_options or {}), "socket_timeout": READ_TIMEOUT_S,
               "socket_connect_timeout": READ_TIMEOUT_S}
    with kombu.Connection(url, transport_options=options) as connection:
        client = redis.Redis(connection_pool=connection.default_channel.pool)
        try:
            yield client
        finally:
            client.close()


def _task_id(raw: bytes | str, wrapped: bool) -> str | None:
    """The task id in one kombu message (a list entry, or an ``unacked`` ``[message, ex, rk]``)."""
    try:
        message = json.loads(raw)
        if wrapped:
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None  # not a Celery message: nothing of ours


def task_ids_on_broker(client: Any, queues: Iterable[str], keys: QueueKeys = QueueKeys()) -> set[str]:
    """Ids of every task waiting in ``queues`` or taken and unacknowledged, read atomically."""
    queued, taken = queued_and_taken(client, queues, keys)
    return queued | taken


def queued_and_taken(client: Any, queues: Iterable[str], keys: QueueKeys = QueueKeys()) -> tuple[set[str], set[str]]:
    """(ids waiting in ``queues``, ids a worker has taken and not acknowledged), read atomically.

    One MULTI/EXEC: kombu moves a message from ``unacked`` back to a list in one transaction
    (``restore_visible``), so separate reads could miss a message that is merely moving.
    """
    list_keys = [keys.list_key(q, step) for q in queues for step in keys.priority_steps]
    with client.pipeline(transaction=True) as pipe:
        for key in list_keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(keys.unacked)
        *lists, unacked = pipe.execute()
    queued = {_task_id(raw, wrapped=False) for entries in lists for raw in entries}
    taken = {_task_id(raw, wrapped=True) for raw in unacked}
    return queued - {None}, taken - {None}  # type: ignore[return-value]
