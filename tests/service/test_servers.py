"""The test servers themselves: real, restartable on the same port, and isolated per test."""

from __future__ import annotations

import pytest

from stylequeue.settings import Settings
from tests.servers import RedisServer, S3Server, port_open


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
