"""What one process keeps between jobs, all in one place: its storage client, the VGG models and
the weights they were built from, its style-target cache and its GPU batcher.

A model costs seconds and hundreds of MB, a boto3 client a TLS handshake, a target cache its whole
point: each is made on first use and reused. One :class:`Resources` per :class:`Settings` (by
value) per process, behind one lock; the Celery tasks, ``stylequeue run`` and the benchmarks all
get theirs from :func:`resources_for`. Built lazily, in the task, so CUDA is first touched in the
pool child after the fork, never in a worker's parent process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

from stylequeue.engine.device import resolve_device
from stylequeue.engine.result import StyleResult
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.engine.weights import LoadedWeights, load_weights
from stylequeue.settings import Settings
from stylequeue.storage import Storage, install_weights_fetchers, open_storage
from stylequeue.storage.target_cache import open_target_cache
from stylequeue.worker.batcher import Batcher
from stylequeue.worker.step import GpuJob, run_jobs

log = logging.getLogger(__name__)

# Models and weights kept per process. A job may name its own weights (JobSpec.weights), so the
# number of distinct ones is the submitters' choice: bounded, least recently used evicted first.
MAX_MODELS = 4
MAX_WEIGHTS = 2
# Tiled passes whose shared inputs a worker keeps (a coarse state of a print is hundreds of MB).
MAX_TILE_PASSES = 2

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A small least-recently-used map; the caller holds the lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class Resources:
    """This process's long-lived objects for one deployment's ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._storage: Storage | None = None
        self._models: _Lru[tuple[Any, ...], VGGFeatures] = _Lru(MAX_MODELS)
        self._weights: _Lru[tuple[Any, ...], LoadedWeights] = _Lru(MAX_WEIGHTS)
        self._target_cache: TargetCache | None = None
        self._target_cache_made = False
        self._batcher: Batcher[GpuJob, StyleResult] | None = None
        self._tile_passes: _Lru[tuple[Any, ...], Any] = _Lru(MAX_TILE_PASSES)
        self._tile_pass_lock = threading.Lock()  # its own: making one takes seconds

    @property
    def storage(self) -> Storage:
        """The storage client (boto3 clients are thread-safe and reusable)."""
        with self._lock:
            if self._storage is None:
                self._storage = open_storage(self.settings)
            return self._storage

    def weights(self, source: str | None = None) -> LoadedWeights:
        """VGG weights from ``source`` (None: the deployment's, whose ``weights_sha256`` is then
        enforced); an ``s3://`` source must lie under the allowed prefixes like any input."""
        settings = self.settings
        source = source or settings.weights
        own = source == settings.weights
        sha256 = settings.weights_sha256 if own else ""
        # The deployment may say which input its weights expect; a job's weights file says itself.
        convention = (settings.weights_convention or None) if own else None
        key = (source, sha256, convention, _file_stamp(source))

        def load() -> LoadedWeights:
            if source.startswith("s3://"):
                # Pulled once through storage (endpoint, credentials, retries), then cached on disk.
                # The fetcher allows the deployment's own weights URI; a job's URI must lie under
                # the allowed prefixes (JobSpec checks it too: belt and braces).
                install_weights_fetchers(settings).check(source)
            return load_weights(source, sha256=sha256 or None, cache_dir=settings.resolved_weights_cache_dir,
                                convention=convention)

        with self._lock:
            return self._weights.get_or_make(key, load)

    def model(self, pooling: str, weights: str | None = None, device: str | None = None) -> VGGFeatures:
        """The VGG feature model for (weights, pooling, device), built once and then reused."""
        target = resolve_device(device or self.settings.device)  # a missing GPU fails before any load
        source = weights or self.settings.weights
        key = (source, _file_stamp(source), pooling, str(target))

        def build() -> VGGFeatures:
            log.info("loading VGG weights %s (%s pooling) on %s", source, pooling, target)
            return VGGFeatures.from_weights(self.weights(weights), pooling=pooling, device=target)

        with self._lock:
            return self._models.get_or_make(key, build)

    def target_cache(self) -> TargetCache | None:
        """The style-target cache (memory, then storage), or None when the settings turn it off."""
        with self._lock:
            if not self._target_cache_made:
                self._target_cache = open_target_cache(self.settings, self.storage)
                self._target_cache_made = True
            return self._target_cache

    def tile_pass(self, key: tuple[Any, ...], make: Callable[[], V]) -> V:
        """What every tile of one pass needs and no tile changes (its start, with the coarse state,
        and the picture's statistics: tasks/tiles.py), made once per worker and pass rather than
        once per tile. A second tile of the pass waits for the first's to be made."""
        with self._tile_pass_lock:
            return self._tile_passes.get_or_make(key, make)

    def batcher(self) -> Batcher[GpuJob, StyleResult]:
        """The GPU thread that runs compatible stylize steps together, started on first use."""
        with self._lock:
            if self._batcher is None:
                settings, cache = self.settings, self.target_cache()

                def runner(jobs: list[GpuJob]) -> list[StyleResult]:
                    return run_jobs(jobs, max_batch=settings.batch_max, target_cache=cache)

                self._batcher = Batcher(runner, batch_max=settings.batch_max, window_s=settings.batch_window_s)
            return self._batcher


def _file_stamp(source: str) -> tuple[int, int] | None:
    """A local file's (mtime, size): an edited weights file is loaded again, not served stale."""
    try:
        stat = os.stat(source)
    except (OSError, ValueError):
        return None
    return (stat.st_mtime_ns, stat.st_size)


_lock = threading.Lock()
_resources: dict[Settings, Resources] = {}


def resources_for(settings: Settings) -> Resources:
    """This process's :class:`Resources` for ``settings`` (equal settings share one)."""
    with _lock:
        found = _resources.get(settings)
        if found is None:
            found = _resources[settings] = Resources(settings)
        return found
