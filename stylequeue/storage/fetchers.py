"""Let the engine load ``s3://`` weights without importing boto3.

The engine keeps a registry of fetchers by URI scheme (:func:`stylequeue.engine.weights.register_fetcher`)
and caches what they fetch under ``weights_cache_dir``; this module registers one backed by
:class:`Storage`, so weights pulls get the same endpoint, credentials, allow-list and retries as
every other object.
"""

from __future__ import annotations

from pathlib import Path

from stylequeue.settings import Settings
from stylequeue.storage.store import Storage, open_storage


def weights_storage(settings: Settings) -> Storage:
    """Storage for weights pulls: the deployment's own weights URI is allowed even when it lies
    outside the job prefixes (operators keep models in their own bucket)."""
    extra = [settings.weights] if settings.weights.startswith("s3://") else []
    return open_storage(settings, extra_prefixes=extra)


def install_weights_fetchers(settings: Settings) -> Storage:
    """Register the ``s3`` weights fetcher for this process; returns the Storage it uses.

    Call once per worker process, before the first :func:`stylequeue.engine.weights.load_weights`.
    ``file://`` weights are read by the engine itself, so only ``s3`` is registered.
    """
    from stylequeue.engine.weights import register_fetcher

    store = weights_storage(settings)

    def fetch(uri: str, dest: Path) -> None:
        store.get_to_file(uri, dest)

    register_fetcher("s3", fetch)
    return store
