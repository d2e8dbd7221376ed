"""The queue-length exporter against a real redis-server and messages sent by the real Celery app.

The test owns its redis-server (not the session one) so queue counts are exact and it can stop
the broker to see ``stylequeue_broker_up`` fall to 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from stylequeue.monitoring.queues import (
    QueueKeys,
    queue_keys,
    queue_lengths,
    queue_priority_lengths,
    unacked_counts,
)
from stylequeue.settings import Settings, load_settings
from stylequeue.tasks.app import TASK_STYLIZE, TASK_VALIDATE, make_app
from testbed.net import free_port, wait_until
from testbed.redis import RedisServer

GPU_PRIORITIES = [0, 0, 3, 5, 5, 9]  # as sent; kombu files each under its priority step
LIGHT_MESSAGES = 2


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def env(own_redis: RedisServer, tmp_path: Path) -> dict[str, str]:
    if not own_redis.running:
        own_redis.start()
    own_redis.client().flushall()
    return {
        "STYLEQUEUE_DATA_DIR": str(tmp_path / "data"),
        "STYLEQUEUE_BROKER_URL": own_redis.url_for(0),
        "STYLEQUEUE_RESULT_BACKEND": own_redis.url_for(1),
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(environ=env)


@pytest.fixture
def app(settings: Settings) -> Iterator[Celery]:
    app = make_app(settings)
    yield app
    app.close()


@pytest.fixture
def keys(app: Celery) -> QueueKeys:
    return queue_keys(app.conf.broker_transport_options)


def send_jobs(app: Celery) -> None:
    """Queue messages the way producers do: by task name, routed by the app, with priorities."""
    for priority in GPU_PRIORITIES:
        app.send_task(TASK_STYLIZE, args=["job"], priority=priority)
    for _ in range(LIGHT_MESSAGES):
        app.send_task(TASK_VALIDATE, args=["job"])


def kombu_message_count(app: Celery, queue: str) -> int:
    """kombu's own count (``Channel._size`` sums the priority lists): the reference."""
    with app.connection_for_read() as conn:
        return conn.default_channel.queue_declare(queue=queue, passive=True).message_count


def test_queue_lengths_sum_every_priority_sub_queue(
    app: Celery, settings: Settings, keys: QueueKeys, own_redis: RedisServer
) -> None:
    send_jobs(app)
    client = own_redis.client()
    gpu = settings.gpu_queue

    # The key layout is kombu's real one: priority 5 lives in "gpu\x06\x165", 0 in "gpu".
    assert client.llen(keys.list_key(gpu, 5)) == 2
    assert client.llen(gpu) == 2
    assert keys.sep == "\x06\x16" and client.exists(f"{gpu}\x06\x169")

    lengths = queue_lengths(client, [gpu, settings.light_queue], keys.priority_steps, keys.sep)
    assert lengths == {gpu: len(GPU_PRIORITIES), settings.light_queue: LIGHT_MESSAGES}
    assert lengths[gpu] == kombu_message_count(app, gpu)
    per_step = queue_priority_lengths(client, [gpu], keys)[gpu]
    assert {s: n for s, n in per_step.items() if n} == {0: 2, 3: 1, 5: 2, 9: 1}


def test_kombu_default_layout_misses_sub_queues_with_other_steps(
    app: Celery, settings: Settings, own_redis: RedisServer
) -> None:
    """Why the app's steps matter: kombu's default steps (0,3,6,9) would not find priority 5."""
    send_jobs(app)
    default = queue_lengths(own_redis.client(), [settings.gpu_queue])
    assert default[settings.gpu_queue] < len(GPU_PRIORITIES)


def test_queue_lengths_follow_a_global_key_prefix(
    app: Celery, settings: Settings, own_redis: RedisServer
) -> None:
    """A deployment sharing Redis may set kombu's ``global_keyprefix``; the exporter follows it."""
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": "sq:"}
    send_jobs(app)
    keys = queue_keys(app.conf.broker_transport_options)
    client = own_redis.client()
    assert client.llen(f"sq:{settings.gpu_queue}") == 2  # kombu really wrote prefixed keys
    lengths = queue_lengths(client, [settings.gpu_queue], keys.priority_steps, keys.sep, keys.prefix)
    assert lengths[settings.gpu_queue] == len(GPU_PRIORITIES)


def test_unacked_counts_reserved_messages(
    app: Celery, settings: Settings, keys: QueueKeys, own_redis: RedisServer
) -> None:
    send_jobs(app)
    client = own_redis.client()
    gpu, light = settings.gpu_queue, settings.light_queue
    with app.connection_for_read() as conn:
        channel = conn.channel()
        message = channel.basic_get(queue=gpu, no_ack=False)  # reserved, as a worker would
        assert message is not None
        assert unacked_counts(client, [gpu, light], keys.unacked_key) == {gpu: 1, light: 0}
        lengths = queue_lengths(client, [gpu], keys.priority_steps, keys.sep)
        assert lengths[gpu] == len(GPU_PRIORITIES) - 1
        message.ack()
        assert unacked_counts(client, [gpu], keys.unacked_key) == {gpu: 0}
        channel.close()


def test_a_jobs_gpu_step_waits_in_a_list_the_keda_redis_triggers_watch(
    env: dict[str, str], tmp_path: Path, own_redis: RedisServer
) -> None:
    """deploy/k8s/keda-scaledobject.yaml names the lists where a real job's GPU step waits.

    The producer sends validate; the light worker, which has the tasks registered, sends stylize
    with the app's default priority, so it waits in "gpu\\x06\\x16<step>", not in "gpu".
    """
    import numpy as np
    import yaml
    from PIL import Image

    from stylequeue.scheduler import submit
    from testbed.workers import CeleryWorker

    inputs = tmp_path / "data" / "objects" / "in"
    inputs.mkdir(parents=True)
    for name, seed in (("content", 1), ("style", 2)):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(inputs / f"{name}.png")
    env = {**env, "STYLEQUEUE_WEIGHTS": "random:0", "STYLEQUEUE_DEVICE": "cpu"}
    settings = load_settings(environ=env)
    app = make_app(settings)
    keda = yaml.safe_load((Path(__file__).parents[2] / "deploy/k8s/keda-scaledobject.yaml").read_text())
    watched = {t["metadata"]["listName"] for t in keda["spec"]["triggers"] if t["type"] == "redis"}
    client = own_redis.client()
    with CeleryWorker(env, settings.light_queue):  # no GPU worker: stylize stays queued
        submit({"job_id": "keda-1", "content": f"file://{inputs}/content.png",
                "styles": [f"file://{inputs}/style.png"], "params": {"size": 32, "iterations": 2}},
               app=app)
        wait_until(lambda: queue_lengths(client, [settings.gpu_queue], range(10))[settings.gpu_queue] == 1,
                   90, "the job's stylize step on the gpu queue")
    waiting = [k.decode() for k in client.keys(f"{settings.gpu_queue}*") if client.type(k) == b"list"]
    assert len(waiting) == 1 and waiting[0] in watched, (waiting, watched)
    app.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def exporter(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = tmp_path / "metrics.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stylequeue", "metrics", "--port", str(port), "--address", "127.0.0.1"],
            env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
        )
    errors: list[str] = []

    def ready() -> bool:
        try:
            return bool(scrape(port))
        except OSError as exc:
            errors.append(repr(exc))
            raise

    try:
        wait_until(ready, 60, "stylequeue metrics",
                   lambda: f"last error: {errors[-1:]}\n" + log.read_text(errors="replace"))
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_metrics_command_serves_queue_gauges(
    app: Celery, settings: Settings, exporter: tuple[subprocess.Popen[bytes], int], own_redis: RedisServer
) -> None:
    proc, port = exporter
    gpu, light = settings.gpu_queue, settings.light_queue
    assert scrape(port)[("stylequeue_queue_length", (("queue", gpu),))] == 0

    send_jobs(app)
    samples = scrape(port)  # read from Redis on every scrape: no stale cache
    assert samples[("stylequeue_broker_up", ())] == 1
    assert samples[("stylequeue_queue_length", (("queue", gpu),))] == len(GPU_PRIORITIES)
    assert samples[("stylequeue_queue_length", (("queue", light),))] == LIGHT_MESSAGES
    assert samples[("stylequeue_queue_priority_length", (("priority", "5"), ("queue", gpu)))] == 2
    assert samples[("stylequeue_queue_unacked", (("queue", gpu),))] == 0

    own_redis.stop()  # a down broker is a value, not a failed scrape
    try:
        assert scrape(port)[("stylequeue_broker_up", ())] == 0
    finally:
        own_redis.start()
    wait_until(lambda: scrape(port)[("stylequeue_broker_up", ())] == 1, 30, "exporter reconnect")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_metrics_command_refuses_a_broker_that_is_not_redis(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
    env["STYLEQUEUE_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "stylequeue", "metrics", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "STYLEQUEUE_BROKER_URL=redis://" in result.stderr
