"""One answer to "is the broker Redis?", and a Sentinel-managed broker read through its master,
against a real redis-server and a real Redis Sentinel."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from stylequeue.exceptions import ConfigError
from stylequeue.monitoring.queues import make_collector
from stylequeue.scheduler.recovery import Recovery
from stylequeue.settings import Settings
from stylequeue.tasks.app import TASK_STYLIZE, celery_config, make_app
from stylequeue.tasks.broker import broker_redis, is_redis_broker
from testbed.net import wait_until
from testbed.redis import RedisServer, RedisSentinel


@pytest.mark.parametrize(
    "url,redis",
    [
        ("redis://h:6379/0", True),
        ("rediss://:pw@h:6380/1", True),
        ("redis+socket:///run/redis.sock", True),
        ("sentinel://h1:26379;sentinel://h2:26379", True),
        ("SENTINEL://h:26379", True),
        ("amqp://guest@h//", False),
        ("filesystem://", False),
        ("memory://", False),
        ("unix:///run/redis.sock", False),  # redis-py's form, not a kombu transport
        ("", False),
    ],
)
def test_is_redis_broker(url: str, redis: bool) -> None:
    assert is_redis_broker(url) is redis


def test_the_app_gives_redis_options_exactly_to_the_brokers_readers_can_read(tmp_path: Path) -> None:
    for url in ("redis://h:6379/0", "sentinel://h:26379", "filesystem://"):
        settings = Settings(data_dir=str(tmp_path), broker_url=url, redis_sentinel_master="m")
        options = celery_config(settings)["broker_transport_options"]
        assert ("priority_steps" in options) is is_redis_broker(url)
        assert ("master_name" in options) is url.startswith("sentinel://")
    with pytest.raises(ConfigError, match="STYLEQUEUE_REDIS_SENTINEL_MASTER"):
        celery_config(Settings(data_dir=str(tmp_path), broker_url="sentinel://h:26379"))
    with pytest.raises(ConfigError, match="reads a Redis broker"):
        with broker_redis("amqp://guest@h//", {}, "the test"):
            pass


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisSentinel]:
    with RedisServer() as master, RedisSentinel(master) as watcher:
        client = watcher.client()
        wait_until(lambda: client.sentinel_get_master_addr_by_name(watcher.name) is not None, 30,
                   "the sentinel to know its master", watcher.log_text)
        yield watcher


def test_a_sentinel_broker_is_read_through_its_master(sentinel: RedisSentinel, tmp_path: Path) -> None:
    """The recovery sweep and the queue exporter both reach a sentinel:// broker: a message sent
    through it is on the master, found by the sweep's broker read and counted by the exporter."""
    queue = f"gpu-{uuid.uuid4().hex[:6]}"
    settings = Settings(data_dir=str(tmp_path), broker_url=sentinel.url_for(0),
                        result_backend=sentinel.master.url_for(1), redis_sentinel_master=sentinel.name,
                        gpu_queue=queue)
    app = make_app(settings)
    task_id = f"sentinel-{uuid.uuid4().hex[:8]}.stylize.0"
    app.send_task(TASK_STYLIZE, args=({},), task_id=task_id, queue=queue, priority=5)
    assert sentinel.master.client().llen(f"{queue}\x06\x165") == 1  # really on the master

    recovery = Recovery(app)
    assert recovery.sweep().skipped == ""  # a Sentinel broker is swept like any Redis one
    assert task_id in recovery.broker_ids()

    samples = {(m.name, tuple(s.labels.items())): s.value
               for m in make_collector(settings).collect() for s in m.samples}
    assert samples[("stylequeue_broker_up", ())] == 1
    assert samples[("stylequeue_queue_length", (("queue", queue),))] == 1
