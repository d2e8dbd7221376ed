"""The fleet's style-target cache: memory, then S3 (moto's real HTTP server)."""

from __future__ import annotations

import torch

from stylequeue.engine import preset, stylize
from stylequeue.engine.targets import LruTargetCache
from stylequeue.engine.config import StyleConfig
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.settings import Settings
from stylequeue.storage import open_storage
from stylequeue.storage.target_cache import CACHE_PREFIX, StorageTargetCache, open_target_cache
from tests.conftest import make_image
from tests.engine.conftest import _Loaded, random_features_state_dict

FAST = dict(size=32, iterations=2, lr=0.01, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
            style_layer_weights=None, style_weight=1e9)
KEY = "ab" * 32


def _model() -> VGGFeatures:
    info = {"source": "random:0", "sha256": None, "random": True, "seed": 0}
    return VGGFeatures.from_weights(_Loaded(random_features_state_dict(0), info), pooling=StyleConfig().pooling)


def test_storage_tier_round_trips_through_s3(settings: Settings) -> None:
    store = open_storage(settings)
    value = {"relu1_1": torch.randn(1, 64, 64), "relu2_1": torch.randn(1, 128, 128)}
    writer = StorageTargetCache(store, settings.resolved_storage_root)
    writer.put(KEY, value)
    uri = f"{settings.resolved_storage_root}/{CACHE_PREFIX}/{KEY}.pt"
    assert store.exists(uri)
    # Another worker: empty memory, same storage.
    reader = StorageTargetCache(store, settings.resolved_storage_root)
    loaded = reader.get(KEY)
    assert loaded is not None and set(loaded) == set(value)
    assert all(torch.equal(loaded[k], value[k]) for k in value)
    assert (reader.storage_hits, reader.memory_hits) == (1, 0)
    assert reader.get(KEY) is not None and reader.memory_hits == 1  # now from memory
    assert reader.get("cd" * 32) is None and reader.misses == 1


def test_a_corrupt_stored_target_is_a_miss(settings: Settings) -> None:
    store = open_storage(settings)
    cache = StorageTargetCache(store, settings.resolved_storage_root)
    store.put_bytes(cache.uri(KEY), b"not a torch file")
    assert cache.get(KEY) is None and cache.misses == 1


def test_a_second_worker_loads_the_style_instead_of_computing_it(settings: Settings) -> None:
    store = open_storage(settings)
    model = _model()
    cfg = preset("default", **FAST)
    content, style = make_image(48, 32, seed=1), make_image(40, 40, seed=2)
    style_calls: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, args: style_calls.append(1) if tuple(args[0].shape) == (1, 3, 32, 32) else None
    )
    try:
        first_worker = open_target_cache(settings, store)
        assert isinstance(first_worker, StorageTargetCache)
        first = stylize(content, [style], cfg, model=model, target_cache=first_worker)
        assert len(style_calls) == 1
        assert len(store.list(f"{settings.resolved_storage_root}/{CACHE_PREFIX}/")) == 1
        second_worker = StorageTargetCache(store, settings.resolved_storage_root, LruTargetCache())
        second = stylize(content, [style], cfg, model=model, target_cache=second_worker)
        assert len(style_calls) == 1 and second_worker.storage_hits == 1
    finally:
        hook.remove()
    assert torch.equal(first.state.image, second.state.image)
    plain = stylize(content, [style], cfg, model=model)
    assert torch.equal(plain.state.image, second.state.image)


def test_settings_choose_the_tiers(settings: Settings) -> None:
    store = open_storage(settings)
    assert open_target_cache(settings.replace(target_cache_mb=0, target_cache_storage=False), store) is None
    assert isinstance(open_target_cache(settings.replace(target_cache_storage=False), store), LruTargetCache)
