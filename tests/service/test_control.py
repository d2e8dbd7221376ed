"""The control store's contract (stylequeue.tasks.control), for Redis and for the file backend alike,
and the remembered-message round trip that lost-message recovery relies on."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from celery import chain

from stylequeue.settings import load_settings
from stylequeue.tasks.app import TASK_PUBLISH, TASK_VALIDATE, make_app
from stylequeue.tasks.control import FileKeyValue, JobControl, KeyValue, RedisKeyValue
from stylequeue.tasks.sent import message_record, resend
from testbed.redis import RedisServer


@pytest.fixture(params=["redis", "file"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> Iterator[KeyValue]:
    if request.param == "redis":
        client = redis_server.client(3)
        client.flushdb()
        yield RedisKeyValue(client, expires_s=3600)
        client.flushdb()
    else:
        yield FileKeyValue(tmp_path / "control")


def test_add_is_first_writer_wins_and_a_ttl_frees_it(store: KeyValue) -> None:
    assert store.add("k", "one") and not store.add("k", "two")
    assert store.get("k") == "one"
    assert store.add("lock", "a", ttl_s=1) and not store.add("lock", "b", ttl_s=1)
    time.sleep(2.1)  # Redis expiry has one-second resolution; the file store compares mtimes
    assert store.add("lock", "c", ttl_s=1)
    store.put("k", "three")
    assert store.get("k") == "three"
    store.delete("k")
    assert store.get("k") is None


def test_incr_counts_from_one(store: KeyValue) -> None:
    assert [store.incr("n") for _ in range(3)] == [1, 2, 3]


def test_index_lists_members_oldest_first(store: KeyValue) -> None:
    for member in ("b", "a", "c"):
        store.index_add("idx", member)
        time.sleep(0.01)  # distinct scores / mtimes
    assert store.index_members("idx") == ["b", "a", "c"]
    store.index_remove("idx", "a")
    store.index_remove("idx", "absent")
    assert store.index_members("idx") == ["b", "c"]


def test_replace_if_is_compare_and_set_and_scored_indexes_page(store: KeyValue) -> None:
    assert not store.replace_if("r", "x", "y")  # nothing to compare with
    store.put("r", "one")
    assert not store.replace_if("r", "zero", "two") and store.get("r") == "one"
    assert store.replace_if("r", "one", "two") and store.get("r") == "two"
    now = time.time()
    for member, score in (("a", now - 3), ("b", now - 1), ("c", now - 2), ("d", now - 1)):
        store.index_add("scored", member, score)
    assert [m for m, _ in store.index_range("scored", None, None, 0, 10)] == ["d", "b", "c", "a"]
    assert [m for m, _ in store.index_range("scored", now - 1.5, now - 2.5, 0, 10)] == ["c"]
    assert [m for m, _ in store.index_range("scored", None, None, 1, 2)] == ["b", "c"]
    if isinstance(store, RedisKeyValue):  # an index expires with the results, as every control key
        assert 3500 < store.client.ttl("scored") <= 3600


def test_missing_since_keeps_the_first_sighting(store: KeyValue, tmp_path: Path) -> None:
    control = JobControl(None, store)  # type: ignore[arg-type]
    assert control.missing_since("t", 100.0) == 100.0
    assert control.missing_since("t", 200.0) == 100.0
    control.clear_missing("t")
    assert control.missing_since("t", 300.0) == 300.0
    assert [control.count_redrive("t") for _ in range(2)] == [1, 2]
    control.release("job", ["t"])
    assert control.count_redrive("t") == 1


def test_a_remembered_message_is_sent_again_unchanged(redis_server: RedisServer, tmp_path: Path) -> None:
    """Every job message is remembered as sent (chain, priority, limits, ids); ``resend`` puts
    the same message on the same queue again."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")},
           "STYLEQUEUE_BROKER_URL": redis_server.url_for(4), "STYLEQUEUE_RESULT_BACKEND": redis_server.url_for(5),
           "STYLEQUEUE_DATA_DIR": str(tmp_path)}
    app = make_app(load_settings(environ=env))
    broker = redis_server.client(4)
    broker.flushdb()
    job_id = f"r-{uuid.uuid4().hex[:6]}"
    work = chain(
        app.signature(TASK_VALIDATE, args=({"job_id": job_id},), immutable=True).set(
            task_id=f"{job_id}.validate", priority=7, time_limit=9, soft_time_limit=8),
        app.signature(TASK_PUBLISH, args=({"job_id": job_id},), immutable=True).set(task_id=f"{job_id}.publish"),
    )
    work.apply_async()
    remembered = JobControl(app).sent_message(f"{job_id}.validate")
    assert remembered is not None
    assert remembered["priority"] == 7 and remembered["time_limit"] == 9 and remembered["soft_time_limit"] == 8
    assert [step["options"]["task_id"] for step in remembered["chain"]] == [f"{job_id}.publish"]
    (first,) = [broker.lpop(k) for k in broker.keys("light*")]  # the one queued message, taken away
    resend(app, remembered, headers={"stylequeue_redrive": 1})
    (again,) = [broker.lpop(k) for k in broker.keys("light*")]
    before, after = json.loads(first), json.loads(again)
    assert after["headers"]["stylequeue_redrive"] == 1
    for field in ("id", "task", "timelimit", "retries", "root_id"):
        assert after["headers"][field] == before["headers"][field], field
    assert after["properties"]["priority"] == before["properties"]["priority"] == 7
    # The body (arguments, and the rest of the chain) is the one first sent.
    assert json.loads(base64.b64decode(after["body"])) == json.loads(base64.b64decode(before["body"]))
    as_sent = (after["headers"], after["properties"], json.loads(base64.b64decode(after["body"])), None)
    assert message_record(TASK_VALIDATE, as_sent, {})["chain"] == remembered["chain"]
    broker.flushdb()
