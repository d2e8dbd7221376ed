"""The ``STYLEQUEUE_*`` environment that points the service at the servers of :mod:`testbed`."""

from __future__ import annotations

from pathlib import Path

from testbed.redis import RedisServer
from testbed.s3 import S3Server


def service_env_for(
    redis: RedisServer, s3: S3Server, bucket: str, data_dir: Path,
    broker_db: int = 0, backend_db: int = 1, **extra: str,
) -> dict[str, str]:
    """``STYLEQUEUE_*`` variables pointing every part of the service at these servers.

    Storage root ``s3://<bucket>/stylequeue``; inputs may live anywhere in ``bucket``, every other
    bucket is refused. Weights are explicit random ones (``random:0``): nothing downloads, nothing
    falls back silently. ``extra`` adds or overrides variables (full names).
    """
    env = {
        "STYLEQUEUE_DATA_DIR": str(data_dir / "data"),
        "STYLEQUEUE_BROKER_URL": redis.url_for(broker_db),
        "STYLEQUEUE_RESULT_BACKEND": redis.url_for(backend_db),
        "STYLEQUEUE_S3_ENDPOINT_URL": s3.endpoint_url,
        "STYLEQUEUE_S3_REGION": s3.region,
        "STYLEQUEUE_S3_ACCESS_KEY_ID": s3.access_key,
        "STYLEQUEUE_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "STYLEQUEUE_S3_ADDRESSING_STYLE": "path",
        "STYLEQUEUE_STORAGE_ROOT": f"s3://{bucket}/stylequeue",
        "STYLEQUEUE_ALLOWED_PREFIXES": f"s3://{bucket}/",
        "STYLEQUEUE_STORAGE_RETRIES": "3",
        "STYLEQUEUE_STORAGE_BACKOFF_S": "0.05",
        "STYLEQUEUE_WEIGHTS": "random:0",
        "STYLEQUEUE_WEIGHTS_CACHE_DIR": str(data_dir / "weights-cache"),
        "STYLEQUEUE_DEVICE": "cpu",
    }
    env.update(extra)
    return env
