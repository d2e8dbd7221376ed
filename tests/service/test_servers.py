"""The test servers themselves: real, restartable on the same port, and isolated per test."""

from __future__ import annotations

import os

import pytest

from stylequeue.settings import Settings
from testbed.net import TcpProxy, port_open
from testbed.redis import RedisServer
from testbed.s3 import S3Server


def test_redis_restarts_on_same_port(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    redis_server.client().set("k", "v")
    port = redis_server.port
    redis_server.stop()
    assert not port_open(port)
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.client().ping()
    # No persistence: a restarted Redis is empty, as a crashed broker without AOF would be.
    assert redis_server.client().get("k") is None


def test_s3_outage_keeps_data(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="a.txt", Body=b"abc")
    s3_server.stop()
    try:
        assert not port_open(s3_server.port)
        with pytest.raises(Exception, match="[Cc]onnect"):
            s3_server.client().get_object(Bucket=s3_bucket, Key="a.txt")
    finally:
        s3_server.start()
    assert client.get_object(Bucket=s3_bucket, Key="a.txt")["Body"].read() == b"abc"


def test_service_env_points_at_test_servers(
    settings: Settings, service_env: dict[str, str], redis_server: RedisServer, s3_bucket: str
) -> None:
    assert all(key.startswith("STYLEQUEUE_") for key in service_env)
    assert settings.broker_url == redis_server.url
    assert settings.resolved_storage_root == f"s3://{s3_bucket}/stylequeue"
    assert settings.weights == "random:0"
    assert f"s3://{s3_bucket}/" in settings.allowed_prefix_list


def test_proxy_outage_keeps_redis_data(redis_server: RedisServer) -> None:
    """A TcpProxy in front of Redis: a network outage that, unlike a restart, loses nothing."""
    import redis

    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: the point is to see the outage, not redis-py riding it out.
        client = redis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        client.set("queued", "job-1")
        proxy.stop()
        with pytest.raises(redis.ConnectionError):
            client.get("queued")
        proxy.start()
        assert client.get("queued") == b"job-1"


def test_moto_process_mode_loses_data_on_restart() -> None:
    """The documented difference: a separate moto process forgets its buckets when restarted."""
    if os.environ.get("STYLEQUEUE_TEST_S3_ENDPOINT"):
        pytest.skip("MinIO configured: the moto modes are not in use")
    with S3Server(mode="process") as server:
        bucket = server.make_bucket()
        server.stop()
        assert not port_open(server.port)
        server.start()
        names = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        assert bucket not in names
