"""Prometheus exporter for the broker's queues: what Flower lacks and an autoscaler needs.

Flower counts task events but never looks at the broker, so it cannot say how many jobs wait.
This module reads the Redis keys that kombu's Redis transport writes and serves them as gauges:

* ``stylequeue_queue_length{queue}``: messages waiting, summed over kombu's priority sub-queues;
* ``stylequeue_queue_priority_length{queue,priority}``: the same per priority step;
* ``stylequeue_queue_unacked{queue}``: messages a worker has reserved but not acknowledged
  (running jobs, with late acknowledgement);
* ``stylequeue_broker_up``: 1 when the last scrape reached Redis, else 0.

kombu keeps one Redis list per (queue, priority step): step 0 is the bare queue name, any other
step is ``<queue><sep><step>`` (``kombu.transport.redis.Channel._q_for_pri``; ``sep`` is
``"\\x06\\x16"`` unless the app's ``broker_transport_options`` change it). A KEDA ``redis`` trigger
on the bare list name sees priority 0 only; scale on ``stylequeue_queue_length`` to see them all.
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable, Iterator, Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stylequeue.settings import Settings
from stylequeue.tasks.broker import (  # noqa: F401 - re-exported: the exporter's key layout
    KOMBU_PRIORITY_STEPS,
    KOMBU_SEP,
    KOMBU_UNACKED_KEY,
    QueueKeys,
    broker_redis,
    queue_keys,
    require_redis_broker,
)

log = logging.getLogger(__name__)


class RedisLike(Protocol):
    """The few redis-py calls the exporter makes (a ``redis.Redis`` satisfies it)."""

    def pipeline(self, transaction: bool = ...) -> Any: ...

    def hvals(self, name: str) -> Any: ...


def queue_priority_lengths(
    redis_client: RedisLike, queues: Iterable[str], keys: QueueKeys = QueueKeys()
) -> dict[str, dict[int, int]]:
    """``{queue: {priority_step: LLEN}}`` in one Redis round trip."""
    queues = list(queues)
    pairs = [(q, step) for q in queues for step in keys.priority_steps]
    with redis_client.pipeline(transaction=False) as pipe:
        for queue, step in pairs:
            pipe.llen(keys.list_key(queue, step))
        sizes = pipe.execute()
    out: dict[str, dict[int, int]] = {q: {} for q in queues}
    for (queue, step), size in zip(pairs, sizes):
        out[queue][step] = int(size or 0)
    return out


def queue_lengths(
    redis_client: RedisLike,
    queues: Iterable[str],
    priority_steps: Iterable[int] = KOMBU_PRIORITY_STEPS,
    sep: str = KOMBU_SEP,
    prefix: str = "",
) -> dict[str, int]:
    """Messages waiting in each queue, summed over its priority sub-queues (as kombu's ``_size``)."""
    keys = QueueKeys(sep=sep, priority_steps=tuple(priority_steps), prefix=prefix)
    per_step = queue_priority_lengths(redis_client, queues, keys)
    return {queue: sum(steps.values()) for queue, steps in per_step.items()}


def unacked_counts(
    redis_client: RedisLike, queues: Iterable[str], unacked_key: str = KOMBU_UNACKED_KEY
) -> dict[str, int]:
    """Reserved-but-unacknowledged messages per queue, from kombu's ``unacked`` hash.

    Each hash value is ``[message, exchange, routing_key]`` (kombu ``QoS.append``); Celery routes
    a queue's tasks with the queue's name as routing key. Messages for other queues are ignored.
    """
    counts = {queue: 0 for queue in queues}
    for raw in redis_client.hvals(unacked_key):
        try:
            _, exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue  # not a kombu entry; never fail a scrape on one odd value
        queue = routing_key if routing_key in counts else exchange
        if queue in counts:
            counts[queue] += 1
    return counts


class QueueCollector(Collector):
    """Reads Redis on every scrape, so the gauges are never staler than the scrape itself.

    ``connect()`` opens a client for one scrape (a context manager): a broker that was down at
    start-up or restarted since is simply reached again.
    """

    def __init__(self, connect: Callable[[], AbstractContextManager[RedisLike]], queues: list[str],
                 keys: QueueKeys) -> None:
        self.connect = connect
        self.queues = queues
        self.keys = keys

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("stylequeue_broker_up", "1 if the last scrape reached the broker")
        try:
            with self.connect() as client:
                per_step = queue_priority_lengths(client, self.queues, self.keys)
                unacked = unacked_counts(client, self.queues, self.keys.unacked)
        except Exception as exc:  # noqa: BLE001 - a down broker is a value (0), not a 500
            log.warning("cannot read queue lengths from the broker: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._families(per_step, unacked)

    def _families(
        self, per_step: dict[str, dict[int, int]], unacked: dict[str, int]
    ) -> Iterator[GaugeMetricFamily]:
        total = GaugeMetricFamily(
            "stylequeue_queue_length", "Messages waiting in the queue (all priorities)", labels=["queue"]
        )
        by_step = GaugeMetricFamily(
            "stylequeue_queue_priority_length",
            "Messages waiting in the queue at one kombu priority step",
            labels=["queue", "priority"],
        )
        reserved = GaugeMetricFamily(
            "stylequeue_queue_unacked",
            "Messages reserved by a worker and not yet acknowledged (running jobs)",
            labels=["queue"],
        )
        for queue, steps in per_step.items():
            total.add_metric([queue], sum(steps.values()))
            for step, size in steps.items():
                by_step.add_metric([queue, str(step)], size)
            reserved.add_metric([queue], unacked.get(queue, 0))
        yield total
        yield by_step
        yield reserved


def make_collector(settings: Settings, queues: list[str] | None = None) -> QueueCollector:
    """A collector for the app's queues, with kombu's key layout read from the Celery app.

    ConfigError at once when the broker is not Redis: there is nothing to export.
    """
    from stylequeue.tasks.app import make_app

    url = settings.resolved_broker_url
    require_redis_broker(url, "the queue exporter")
    options = make_app(settings).conf.broker_transport_options
    names = queues or [settings.gpu_queue, settings.light_queue]
    return QueueCollector(lambda: broker_redis(url, options, "the queue exporter"), names, queue_keys(options))


def serve_metrics(settings: Settings, port: int | None = None, address: str | None = None) -> None:
    """Serve ``/metrics`` until SIGTERM or SIGINT (what ``stylequeue metrics`` runs)."""
    import signal
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(make_collector(settings))
    port = settings.metrics_port if port is None else port
    address = settings.metrics_address if address is None else address
    server, thread = start_http_server(port, addr=address, registry=registry)
    log.info("serving queue metrics on http://%s:%d/metrics", address, server.server_port)
    print(f"stylequeue metrics: serving http://{address}:{server.server_port}/metrics", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
