"""Style targets: computed once per style and settings, keyed by everything they depend on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stylequeue.engine import preset, stylize
from stylequeue.engine import BatchItem, StyleConfig, stylize_batch
from stylequeue.engine.targets import LruTargetCache, image_digest, style_target_key, targets_nbytes
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.engine.weights import WeightsInfo
from tests.conftest import make_image

FAST = dict(size=32, iterations=3, lr=0.01, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
            style_layer_weights=None, style_weight=1e9)
RANDOM = {"source": "random:0", "sha256": None, "random": True, "seed": 0}


def _count_style_forwards(model: VGGFeatures, style_shape: tuple[int, ...]) -> tuple[list[int], object]:
    calls: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, args: calls.append(1) if tuple(args[0].shape) == style_shape else None
    )
    return calls, hook


def test_second_job_with_the_same_style_does_not_recompute(model: VGGFeatures, content_image, style_image) -> None:
    cfg = preset("default", **FAST)
    cache = LruTargetCache()
    other_content = make_image(32, 48, seed=7)
    calls, hook = _count_style_forwards(model, (1, 3, 32, 32))  # the 40 x 40 style at 32 px
    try:
        first = stylize(content_image, [style_image], cfg, model=model, target_cache=cache)
        assert len(calls) == 1 and len(cache) == 1
        second = stylize(other_content, [style_image], cfg.replace(lr=0.05, seed=3), model=model,
                         target_cache=cache)
        assert len(calls) == 1 and cache.hits == 1  # the style was not run through VGG again
        batch = stylize_batch([BatchItem(content_image, [style_image]), BatchItem(content_image, [style_image])],
                              cfg, model=model, target_cache=cache)
        assert len(calls) == 1 and cache.hits == 3
    finally:
        hook.remove()
    # Results with cached targets equal results without, bit for bit.
    uncached = stylize(content_image, [style_image], cfg, model=model)
    assert torch.equal(first.state.image, uncached.state.image)
    assert torch.equal(batch[0].state.image, batch[1].state.image)
    again = stylize(other_content, [style_image], cfg.replace(lr=0.05, seed=3), model=model)
    assert torch.equal(second.state.image, again.state.image)


def test_original_colors_targets_follow_the_content(model: VGGFeatures, content_image, style_image) -> None:
    """Luminance-only transfer matches the style's luma to the content's: the key must see that."""
    cfg = preset("default", **FAST, original_colors=True)
    cache = LruTargetCache()
    cached = stylize(content_image, [style_image], cfg, model=model, target_cache=cache)
    other = make_image(48, 32, seed=9)
    stylize(other, [style_image], cfg, model=model, target_cache=cache)
    assert len(cache) == 2 and cache.hits == 0
    plain = stylize(content_image, [style_image], cfg, model=model)
    again = stylize(content_image, [style_image], cfg, model=model, target_cache=cache)
    assert cache.hits == 1
    assert torch.equal(cached.state.image, plain.state.image) and torch.equal(again.state.image, plain.state.image)


def test_every_setting_the_targets_depend_on_changes_the_key(style_image) -> None:
    cfg = preset("default", **FAST)
    digest = image_digest(style_image)
    base = style_target_key(digest, cfg, RANDOM, 32)
    assert base is not None and len(base) == 64
    changed = {
        "style image": style_target_key(image_digest(make_image(40, 40, seed=99)), cfg, RANDOM, 32),
        "size": style_target_key(digest, cfg, RANDOM, 64),
        "style_scale": style_target_key(digest, cfg.replace(style_scale=0.5), RANDOM, 32),
        "layers": style_target_key(digest, cfg.replace(style_layers=("relu1_1",)), RANDOM, 32),
        "pooling": style_target_key(digest, cfg.replace(pooling="avg" if cfg.pooling == "max" else "max"), RANDOM, 32),
        "gram_norm": style_target_key(
            digest, cfg.replace(gram_norm="chw" if cfg.gram_norm != "chw" else "sqrt_chw"), RANDOM, 32),
        "weights seed": style_target_key(digest, cfg, {**RANDOM, "seed": 1, "source": "random:1"}, 32),
        "weights file": style_target_key(digest, cfg, WeightsInfo("/w.pth", "ab" * 32), 32),
        "precision": style_target_key(digest, cfg, RANDOM, 32, precision="bf16", device_type="cuda"),
        "original_colors": style_target_key(digest, cfg.replace(original_colors=True), RANDOM, 32,
                                            luminance_stats=(0.5, 0.1)),
        "luminance": style_target_key(digest, cfg.replace(original_colors=True), RANDOM, 32,
                                      luminance_stats=(0.5, 0.2)),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)
    # Settings the targets do not depend on share the key.
    same = [cfg.replace(lr=0.5), cfg.replace(seed=4, iterations=9), cfg.replace(content_weight=3.0, tv_weight=1.0)]
    assert {style_target_key(digest, c, RANDOM, 32) for c in same} == {base}
    # The same pixels in another file share the key; weights nobody can name disable caching.
    assert image_digest(style_image.copy()) == digest
    assert style_target_key(digest, cfg, {"source": "/somewhere.pth", "sha256": None}, 32) is None
    with pytest.raises(ValueError, match="luminance_stats"):
        style_target_key(digest, cfg.replace(original_colors=True), RANDOM, 32)


def test_unnamed_weights_are_not_cached(vgg_state_dict, content_image, style_image) -> None:
    @dataclasses.dataclass
    class Loaded:
        state_dict: dict
        info: object

    model = VGGFeatures.from_weights(Loaded(vgg_state_dict, None), pooling=StyleConfig().pooling)
    cache = LruTargetCache()
    stylize(content_image, [style_image], preset("default", **{**FAST, "iterations": 1}), model=model,
            target_cache=cache)
    assert len(cache) == 0


def test_lru_is_bounded_by_bytes() -> None:
    def targets(n: int) -> dict[str, torch.Tensor]:
        return {"relu1_1": torch.full((1, 8, 8), float(n))}  # 256 bytes

    one = targets_nbytes(targets(0))
    cache = LruTargetCache(max_bytes=3 * one)
    for n in range(3):
        cache.put(f"k{n}", targets(n))
    assert cache.get("k0") is not None  # k0 is now the most recently used
    cache.put("k3", targets(3))
    assert cache.get("k1") is None and cache.get("k0") is not None and cache.get("k3") is not None
    assert len(cache) == 3 and cache.nbytes == 3 * one
    cache.put("huge", {"relu1_1": torch.zeros(1, 64, 64)})
    assert cache.get("huge") is None and len(cache) == 3  # larger than the cache: not kept
