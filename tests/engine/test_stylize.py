"""stylize(): reproducibility, stopping, progress, blends, colours, scales and inits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stylequeue.engine import Progress, preset, scale_sizes, stylize
from stylequeue.engine.color import rgb_to_yiq
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

# Shallow layers and 32 px keep each step cheap; the layer cut skips everything deeper.
FAST = dict(size=32, iterations=4, lr=0.01, content_layers=("relu2_1",),
            style_layers=("relu1_1", "relu2_1"), style_layer_weights=None, style_weight=1e9)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def test_seeded_noise_run_repeats_bit_for_bit(model: VGGFeatures, content_image, style_image) -> None:
    cfg = preset("default", **FAST, init="noise", seed=3, ema_decay=0.5)
    a = stylize(content_image, [style_image], cfg, model=model)
    b = stylize(content_image, [style_image], cfg, model=model)
    assert a.image.tobytes() == b.image.tobytes()
    assert torch.equal(a.state.image, b.state.image)
    other = stylize(content_image, [style_image], cfg.replace(seed=4), model=model)
    assert not torch.equal(a.state.image, other.state.image)


def test_should_stop_stops_within_one_iteration(model: VGGFeatures, content_image, style_image) -> None:
    polls: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 2  # allow two iterations, then stop

    cfg = preset("default", **{**FAST, "iterations": 50})
    result = stylize(content_image, [style_image], cfg, model=model, should_stop=should_stop)
    assert result.stopped and result.state is not None
    assert result.state.iteration == 2 and len(polls) == 3
    assert result.image.size == (32, 21)


def test_callback_cadence_and_progress_fields(model: VGGFeatures, content_image, style_image) -> None:
    seen: list[Progress] = []
    cfg = preset("default", **{**FAST, "iterations": 7}, progress_every=3, tv_weight=1.0)
    result = stylize(content_image, [style_image], cfg, model=model, callback=seen.append)
    assert [p.iteration for p in seen] == [3, 6, 7]  # every 3 and at the end
    last = seen[-1]
    assert (last.total, last.scale_index, last.num_scales, last.width, last.height) == (7, 0, 1, 32, 21)
    assert last.loss == pytest.approx(last.content_loss + last.style_loss + last.tv_loss, rel=1e-5)
    assert last.tv_loss > 0 and last.elapsed_s > 0 and last.its_per_s > 0 and last.eta_s == 0
    assert seen[0].eta_s > 0
    preview = last.preview()
    assert isinstance(preview, Image.Image) and preview.size == (32, 21)
    assert [h["iteration"] for h in result.history] == [3, 6, 7]
    assert result.history[-1]["loss"] == last.loss


def test_metadata_is_json_and_says_random_weights(model: VGGFeatures, content_image, style_image) -> None:
    cfg = preset("default", **FAST)
    meta = stylize(content_image, [style_image], cfg, model=model).metadata()
    decoded = json.loads(json.dumps(meta))
    assert decoded["config"] == cfg.to_dict() and decoded["random_weights"] is True
    assert decoded["device"] == "cpu" and decoded["precision"] == "fp32"
    assert {"torch", "torchvision", "pillow"} <= set(decoded["versions"])
    assert decoded["history"] and decoded["timings"]["iterations"] == 4


def test_blend_weights_select_and_mix_styles(
    model: VGGFeatures, content_image, style_image, second_style_image
) -> None:
    cfg = preset("default", **FAST)
    only_first = stylize(content_image, [style_image], cfg, model=model).state.image
    blend_first = stylize(content_image, [style_image, second_style_image],
                          cfg.replace(style_blend_weights=(2.0, 0.0)), model=model).state.image
    torch.testing.assert_close(blend_first, only_first)
    mixed = stylize(content_image, [style_image, second_style_image], cfg, model=model).state.image
    assert not torch.allclose(mixed, only_first)
    with pytest.raises(ConfigError, match="one weight per style"):
        stylize(content_image, [style_image], cfg.replace(style_blend_weights=(1.0, 1.0)), model=model)


def test_original_colors_keep_the_content_chroma(model: VGGFeatures, content_image) -> None:
    red_style = Image.new("RGB", (32, 32), (220, 30, 30))
    red_style.paste(Image.new("RGB", (16, 16), (255, 90, 60)), (8, 8))
    cfg = preset("default", **{**FAST, "iterations": 8, "lr": 0.05})
    content_iq = rgb_to_yiq(torch.from_numpy(_array(content_image.resize((32, 21)))).permute(2, 0, 1)[None])[:, 1:]

    def chroma_error(image: Image.Image) -> float:
        iq = rgb_to_yiq(torch.from_numpy(_array(image)).permute(2, 0, 1)[None])[:, 1:]
        return float((iq - content_iq).abs().mean())

    plain = stylize(content_image, [red_style], cfg, model=model).image
    kept = stylize(content_image, [red_style], cfg.replace(original_colors=True), model=model).image
    assert chroma_error(kept) < 0.02  # only 8-bit rounding and [0, 1] clipping remain
    assert chroma_error(plain) > 2 * chroma_error(kept)


def test_multi_scale_ends_at_full_size(model: VGGFeatures, content_image, style_image) -> None:
    sizes: list[tuple[int, int, int]] = []
    cfg = preset("default", **{**FAST, "iterations": 2}, scales=3, min_size=16, progress_every=1, ema_decay=0.5)
    result = stylize(content_image, [style_image], cfg, model=model,
                     callback=lambda p: sizes.append((p.scale_index, p.width, p.height)))
    assert scale_sizes(32, 16, 3) == [16, 23, 32]
    assert result.image.size == (32, 21)
    assert sorted(set(sizes)) == [(0, 16, 11), (1, 23, 15), (2, 32, 21)]
    assert result.state.iteration == 6 and result.state.scale_index == 2


def test_style_keeps_its_own_aspect_ratio(model: VGGFeatures, content_image) -> None:
    """The seed resized the style to the content's shape transposed; we keep the style's aspect."""
    shapes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    tall_style = Image.new("RGB", (20, 40), (10, 200, 10))
    try:
        stylize(content_image, [tall_style], preset("default", **{**FAST, "iterations": 1}, style_scale=0.5),
                model=model)
    finally:
        hook.remove()
    assert shapes[0] == (1, 3, 21, 32)  # content target
    assert shapes[1] == (1, 3, 16, 8)  # style: longest side 0.5 * 32, its own 1:2 aspect


def test_init_image_and_its_errors(model: VGGFeatures, content_image, style_image) -> None:
    start = Image.new("RGB", (10, 10), (128, 0, 255))
    cfg = preset("default", **{**FAST, "iterations": 1, "lr": 1e-6}, init="image")
    out = _array(stylize(content_image, [style_image], cfg, model=model, init_image=start).image)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), [128 / 255, 0, 1], atol=0.01)
    with pytest.raises(ConfigError, match="no initial image"):
        stylize(content_image, [style_image], cfg, model=model)
    with pytest.raises(ConfigError, match="set init to 'image'"):
        stylize(content_image, [style_image], preset("default", **FAST), model=model, init_image=start)
    with pytest.raises(ConfigError, match="pooling"):
        stylize(content_image, [style_image], preset("default", **FAST, pooling="avg"), model=model)
    with pytest.raises(ConfigError, match="at least one style"):
        stylize(content_image, [], preset("default", **FAST), model=model)


def test_targets_are_computed_once_per_scale(
    model: VGGFeatures, content_image, style_image, second_style_image
) -> None:
    """One forward for the content, one per style, per scale; then one per step, with grad."""
    calls: list[bool] = []
    hook = model.register_forward_pre_hook(lambda _m, _a: calls.append(torch.is_grad_enabled()))
    cfg = preset("default", **{**FAST, "iterations": 3}, scales=2, min_size=16)
    try:
        stylize(content_image, [style_image, second_style_image], cfg, model=model)
    finally:
        hook.remove()
    per_scale = [False, False, False] + [True] * 3
    assert calls == per_scale * 2
