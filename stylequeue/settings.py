"""Service settings: one dataclass, one environment prefix.

Override order (each overrides the one before):

1. the defaults written below;
2. a TOML file named by ``STYLEQUEUE_CONFIG`` (keys are the field names);
3. ``STYLEQUEUE_<FIELD>`` environment variables (for example ``STYLEQUEUE_BROKER_URL``);
4. explicit overrides passed by the caller (the command line).

With nothing set, the service runs on one machine with no servers: a filesystem broker, a file
result backend and ``file://`` storage under ``data_dir``. A deployment points ``broker_url`` and
``result_backend`` at Redis and ``storage_root``/``allowed_prefixes`` at S3.

The engine's own defaults (layers, weights, iterations) are not here: they live in
:class:`stylequeue.engine.config.StyleConfig` and are written once there.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from stylequeue.exceptions import ConfigError

ENV_PREFIX = "STYLEQUEUE_"


def _default_data_dir() -> str:
    return str(Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "stylequeue")


@dataclass(frozen=True)
class Settings:
    """Everything a producer, worker, scheduler or Flower process reads from its environment."""

    # Where the zero-server defaults keep their files.
    data_dir: str = field(default_factory=_default_data_dir)

    # Celery. Empty means "zero-server default under data_dir".
    broker_url: str = ""
    result_backend: str = ""
    # With sentinel:// URLs (Redis Sentinel failover): the name of the master they watch.
    redis_sentinel_master: str = ""
    gpu_queue: str = "gpu"
    light_queue: str = "light"
    # Longest job we expect, in seconds; the visibility timeout and time limits derive from it.
    job_time_limit: int = 3600
    job_soft_time_limit: int = 3300
    # Redis visibility timeout: must exceed the longest job, or Redis redelivers a running job.
    visibility_timeout: int = 7200
    result_expires: int = 7 * 24 * 3600
    # A job delivered more often than this is a poison job and is failed, not run again.
    max_deliveries: int = 3
    task_max_retries: int = 5

    # Object storage.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # Path-style addressing is what MinIO and most S3-compatible servers need.
    s3_addressing_style: str = "path"
    # Where job inputs may be read and outputs written: comma-separated URI prefixes.
    # Empty means "storage_root only".
    allowed_prefixes: str = ""
    # Default prefix for outputs, checkpoints and caches. Empty means file://<data_dir>/objects.
    storage_root: str = ""
    storage_retries: int = 5
    storage_backoff_s: float = 0.5

    # Engine inputs the deployment controls.
    weights: str = "imagenet"
    weights_sha256: str = ""
    # The input the weights expect, "torchvision" or "caffe"; empty: what the file records, else
    # torchvision. A file that records another is refused.
    weights_convention: str = ""
    weights_cache_dir: str = ""
    max_pixels: int = 4096 * 4096
    # The memory of one GPU worker's device (MB). A job too large for it is tiled at submit
    # (its final scale as tiles spread over the fleet, docs/tiles.md); 0: only jobs that ask.
    worker_memory_mb: int = 0
    device: str = "auto"

    # Throughput (docs/throughput.md). batch_max > 1 runs that many compatible jobs as one batch
    # on the GPU (the worker then uses a threads pool: see `stylequeue worker --batch`); jobs
    # arriving within batch_window_s of the first one join its batch.
    batch_max: int = 1
    batch_window_s: float = 0.1
    # Style targets (Gram matrices) kept per worker in memory (MB; 0 = none) and, for the fleet,
    # under <storage_root>/cache/style-targets/.
    target_cache_mb: int = 256
    target_cache_storage: bool = True

    # Work cadence inside a job.
    progress_every: int = 10
    preview_every: int = 100
    checkpoint_every: int = 50

    # Periodic work (Celery beat) and what producers may keep in flight.
    # Previews are deleted this many days after they were written; 0 keeps them.
    preview_retention_days: int = 7
    expire_previews_every_s: int = 3600
    # Manifests dropped under <storage_root>/manifests/incoming/ are picked up this often.
    scan_manifests_every_s: int = 60
    # Lost-message recovery (docs/reliability.md): every recover_every_s, beat re-sends a job
    # message that has been on no queue for recover_after_s (0: the visibility timeout).
    recover_every_s: int = 10
    recover_after_s: int = 0
    # A running stylize step holds a lease on its job, renewed every third of this; a step whose
    # lease lapsed (its worker died) is sent again by the sweep, to resume on another worker.
    lease_ttl_s: int = 20
    # On SIGTERM a worker drains: a step that cannot end within this many seconds checkpoints and
    # hands its job back at once (a spot preemption gives two minutes; Kubernetes' default 30 s).
    shutdown_grace_s: int = 25
    manifest_max_in_flight: int = 8

    # Webhooks (docs/service.md#webhooks). Deliveries are signed with this key (Standard Webhooks:
    # "whsec_<base64>"; several, comma-separated, while rotating); a job asking for a webhook is
    # refused at submit without one. They go only where webhook_allowed says: comma-separated hosts
    # ("hooks.example.com", "*.example.com", "*" for any public host) or URL prefixes; a private or
    # loopback address only when its host or prefix is listed by name. Each attempt waits
    # webhook_timeout_s; failed attempts are retried with backoff for webhook_retry_for_s.
    # webhook_presign_s > 0 puts a presigned result URL of that lifetime in `succeeded` (s3 only).
    webhook_secret: str = ""
    webhook_allowed: str = ""
    webhook_timeout_s: float = 5.0
    webhook_retry_for_s: int = 3600
    webhook_presign_s: int = 0
    webhook_progress_every_s: float = 5.0

    # Flower.
    flower_port: int = 5555
    flower_address: str = "127.0.0.1"
    # "user:password[,user2:password2]"; required unless flower_insecure_no_auth is set.
    flower_basic_auth: str = ""
    flower_insecure_no_auth: bool = False
    # Seconds after which Flower forgets a worker that went offline (scaled-down pods).
    flower_purge_offline_workers: int = 300
    # The URL users reach Flower at (a proxy, a port-forward); `stylequeue status` links a job's
    # task under it. Empty: http://<flower_address>:<flower_port>.
    flower_url: str = ""

    # Queue-length exporter (`stylequeue metrics`), what autoscalers read.
    metrics_port: int = 9540
    metrics_address: str = "127.0.0.1"
    # Each `stylequeue worker`'s own /metrics (per-GPU utilisation and memory, its processes);
    # 0: not served.
    worker_metrics_port: int = 0
    worker_metrics_address: str = "127.0.0.1"

    @property
    def resolved_broker_url(self) -> str:
        # "localhost": kombu warns about a URL without a host, though this transport needs none.
        return self.broker_url or "filesystem://localhost//"

    @property
    def resolved_result_backend(self) -> str:
        return self.result_backend or f"file://{Path(self.data_dir) / 'results'}"

    @property
    def resolved_recover_after_s(self) -> int:
        return self.recover_after_s or self.visibility_timeout

    @property
    def resolved_storage_root(self) -> str:
        return (self.storage_root or f"file://{Path(self.data_dir) / 'objects'}").rstrip("/")

    @property
    def allowed_prefix_list(self) -> list[str]:
        extra = [p.strip() for p in self.allowed_prefixes.split(",") if p.strip()]
        return [self.resolved_storage_root, *extra]

    @property
    def resolved_flower_url(self) -> str:
        if self.flower_url:
            return self.flower_url.rstrip("/")
        # A wildcard bind address is no place to browse to: this machine's loopback is.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.flower_address, self.flower_address)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.flower_port}"

    @property
    def resolved_weights_cache_dir(self) -> str:
        return self.weights_cache_dir or str(Path(self.data_dir) / "weights")

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        # The dataclass repr would print the S3 secret and Flower password wherever a Settings is
        # logged or shown in a traceback (pytest prints fixture values); show the redacted form.
        fields_text = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({fields_text})"

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, with secrets masked, for logs and metadata."""
        out = dataclasses.asdict(self)
        for key in ("s3_secret_access_key", "s3_access_key_id", "flower_basic_auth", "webhook_secret"):
            if out.get(key):
                out[key] = "***"
        for key in ("broker_url", "result_backend"):
            out[key] = redact_url(out[key])
        return out


def redact_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host``: URLs may carry passwords."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            value = str(raw).strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"setting {name!r} must be {typ.__name__}, got {raw!r} "
            f"(from {ENV_PREFIX}{name.upper()} or the config file)"
        ) from None


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build :class:`Settings` from defaults, config file, environment and ``overrides``."""
    env = os.environ if environ is None else environ
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    config_path = env.get(ENV_PREFIX + "CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                file_values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {ENV_PREFIX}CONFIG={config_path}: {exc}") from None
        unknown = set(file_values) - known
        if unknown:
            raise ConfigError(f"unknown settings in {config_path}: {', '.join(sorted(unknown))}")
        values.update(file_values)

    for name in known:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = env[key]

    for name, value in (overrides or {}).items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value

    coerced = {name: _coerce(name, raw, hints[name]) for name, raw in values.items()}
    return Settings(**coerced)
