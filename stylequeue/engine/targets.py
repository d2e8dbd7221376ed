"""Style targets shared across jobs: a style image's Gram matrices, computed once and cached.

A style target (one Gram matrix per style layer, Gatys et al. 2015 eq. 3, or a mean and second
moment for the Wasserstein loss) depends only on the style image, the side it is resized to, the
layer set, the pooling, the kind of statistic and the Gram normalisation, the
weights and the forward pass's precision; for luminance-only transfer (Gatys et al. 2016) also on
the content luminance's mean and std, which the style's luminance is matched to. All of these go
into :func:`style_target_key`, so two jobs that share a key get bitwise the same targets.

The engine only knows the :class:`TargetCache` protocol and the in-memory
:class:`LruTargetCache`; the service adds a storage tier (stylequeue/storage/target_cache.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any, Mapping, Protocol

import torch
from PIL import Image

from stylequeue.engine.config import StyleConfig, style_side

# Bump when the way targets are computed changes, so stale cached targets are never used.
TARGET_FORMAT = 2  # 2: the key names the kind of statistic (style_loss)
# {layer name: (1, C, C) float32 Gram matrix}, or for the Wasserstein loss second moments and
# means (objective.MEAN_SUFFIX).
Targets = dict[str, torch.Tensor]


class TargetCache(Protocol):
    """Where computed style targets are kept; any object with these two methods will do."""

    def get(self, key: str) -> Targets | None: ...

    def put(self, key: str, value: Targets) -> None: ...


def image_digest(image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels (and their shape): what the Gram matrices depend on.

    Hashing pixels, not file bytes, makes a PNG and a re-encoded copy with the same pixels share
    a target, and needs nothing but the PIL image the engine already holds.
    """
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def weights_identity(info: Any) -> str | None:
    """A stable name for the weights: their sha256, or the seed of random weights; None if unknown."""
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        info = dataclasses.asdict(info)
    if not isinstance(info, Mapping):
        return None
    if info.get("sha256"):
        return f"sha256:{info['sha256']}"
    if info.get("random") and info.get("seed") is not None:
        return f"random:{info['seed']}"
    return None


def style_target_key(
    style: str,
    config: StyleConfig,
    weights_info: Any,
    size: int,
    *,
    precision: str = "fp32",
    device_type: str = "cpu",
    luminance_stats: tuple[float, float] | None = None,
) -> str | None:
    """sha256 of everything a style target depends on; None when the weights cannot be named.

    ``style`` is :func:`image_digest` of the style image; ``size`` the output's longest side at
    this scale. ``precision`` and ``device_type`` are in the key because a bf16 forward (CUDA)
    gives other Gram matrices than an fp32 one. ``luminance_stats`` (the content luma's mean and
    std) is required when ``config.original_colors`` is set.
    """
    weights = weights_identity(weights_info)
    if weights is None:
        return None
    if config.original_colors and luminance_stats is None:
        raise ValueError("original_colors targets depend on the content's luminance: pass luminance_stats")
    fields = {
        "format": TARGET_FORMAT,
        "style": style,
        "side": style_side(config, size),
        "layers": list(config.style_layers),
        "pooling": config.pooling,
        "gram_norm": config.gram_norm,
        "style_loss": config.style_loss,
        "original_colors": config.original_colors,
        # float.hex is exact: the same float32 statistics give the same key, any others another.
        "luminance": [float(v).hex() for v in luminance_stats] if config.original_colors else None,
        "weights": weights,
        "precision": precision,
        "device_type": device_type,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def targets_nbytes(value: Targets) -> int:
    return sum(t.numel() * t.element_size() for t in value.values())


class LruTargetCache:
    """In-memory cache bounded by bytes; least recently used targets are evicted first.

    Thread-safe: the worker's task threads and its GPU thread may share one. At 512 px the five
    relu*_1 Gram matrices of one style are ~2.3 MB (64^2 + 128^2 + 256^2 + 2 * 512^2 floats).
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Targets] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Targets | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return dict(value)

    def put(self, key: str, value: Targets) -> None:
        size = targets_nbytes(value)
        if size > self.max_bytes:
            return  # larger than the whole cache: keeping it would evict everything else
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= targets_nbytes(old)
            self._items[key] = {k: v.detach() for k, v in value.items()}
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= targets_nbytes(evicted)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
