"""Style targets shared by the fleet: this process's memory first, then object storage.

A style's Gram matrices cost one VGG forward of the style image per job and scale; with the
same style used by many jobs (a batch, a manifest), workers compute them once and every other
worker loads them from ``<storage_root>/cache/style-targets/<key>.pt``. Keys come from
:func:`stylequeue.engine.targets.style_target_key` (sha256 of the style's pixels and every
setting the targets depend on), so a stored target is never stale, only unused.

The cache never fails a job: a storage error or an unreadable object counts as a miss and is
logged; the job then computes the targets itself.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from stylequeue.engine.targets import LruTargetCache, Targets
from stylequeue.exceptions import ObjectNotFoundError, StorageError
from stylequeue.settings import Settings

log = logging.getLogger(__name__)

CACHE_PREFIX = "cache/style-targets"
_KEY = re.compile(r"^[0-9a-f]{64}$")


class StorageTargetCache:
    """Two tiers: an in-memory :class:`LruTargetCache`, then ``<root>/cache/style-targets/``.

    ``store`` is a :class:`stylequeue.storage.Storage` (anything with get_bytes/put_bytes).
    Counters (``memory_hits``, ``storage_hits``, ``misses``) feed logs and tests.
    """

    def __init__(self, store: Any, root: str, memory: LruTargetCache | None = None) -> None:
        self.store = store
        self.root = root.rstrip("/")
        self.memory = memory if memory is not None else LruTargetCache()
        self.memory_hits = 0
        self.storage_hits = 0
        self.misses = 0

    def uri(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"a style-target key is a sha256 hex digest, got {key!r}")
        return f"{self.root}/{CACHE_PREFIX}/{key}.pt"

    def get(self, key: str) -> Targets | None:
        value = self.memory.get(key)
        if value is not None:
            self.memory_hits += 1
            return value
        value = self._load(key)
        if value is None:
            self.misses += 1
            return None
        self.storage_hits += 1
        self.memory.put(key, value)
        return value

    def put(self, key: str, value: Targets) -> None:
        self.memory.put(key, value)
        buffer = io.BytesIO()
        torch.save({name: t.detach().to("cpu", copy=True) for name, t in value.items()}, buffer)
        try:
            self.store.put_bytes(self.uri(key), buffer.getvalue(), "application/octet-stream")
        except StorageError as exc:
            log.warning("style target %s not stored (%s); other workers will compute it again", key[:12], exc)

    def _load(self, key: str) -> Targets | None:
        uri = self.uri(key)
        try:
            data = self.store.get_bytes(uri)
        except ObjectNotFoundError:
            return None
        except StorageError as exc:
            log.warning("style target %s unreadable from storage (%s); computing it", key[:12], exc)
            return None
        try:
            # weights_only: a cached object in shared storage must not be able to run code.
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or foreign files
            log.warning("style target %s in %s is corrupt (%s); computing it", key[:12], uri, exc)
            return None
        if not isinstance(value, dict) or not all(isinstance(t, torch.Tensor) for t in value.values()):
            log.warning("style target %s in %s is not a dict of tensors; computing it", key[:12], uri)
            return None
        return value


def open_target_cache(settings: Settings, store: Any) -> StorageTargetCache | LruTargetCache | None:
    """The cache a worker uses: memory (``target_cache_mb``) and, if enabled, storage; None if off."""
    if settings.target_cache_mb <= 0 and not settings.target_cache_storage:
        return None
    memory = LruTargetCache(max_bytes=max(0, settings.target_cache_mb) * 2**20)
    if not settings.target_cache_storage:
        return memory
    return StorageTargetCache(store, settings.resolved_storage_root, memory)
