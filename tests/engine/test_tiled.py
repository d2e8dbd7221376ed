"""Tiled pictures (engine/tiled.py): a final scale as overlapping tiles, with the whole picture's
style targets and the coarse result as every tile's start; seams measured, not eyeballed."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stylequeue.engine import preset, stylize
from stylequeue.engine.tensors import to_tensor
from stylequeue.engine.tiled import final_plan, stylize_tiled, tile_config
from stylequeue.engine.tiles import seam_energy
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError
from tests.conftest import make_image

FAST = dict(iterations=4, content_layers=("relu2_1",), style_layers=("relu1_1", "relu2_1"),
            style_layer_weights=None, loss_norm="relative", style_weight=3.0)


def test_a_256_px_picture_from_96_px_tiles(model_avg: VGGFeatures) -> None:
    content, style = make_image(256, 170, seed=1), make_image(96, 96, seed=2)
    cfg = preset("default", size=256, scales=2, min_size=96, tile_size=96, tile_overlap=24, **FAST)
    plan = final_plan(cfg, content.size)
    assert (plan.width, plan.height) == (256, 170) and (len(plan.columns), len(plan.rows)) == (4, 3)
    seen = []
    result = stylize_tiled(content, [style], cfg, model=model_avg, callback=seen.append)
    assert result.image.size == (256, 170) and not result.stopped
    assert {p.tile for p in seen if p.tiles} == set(range(12))  # every tile ran
    assert seen[-1].iteration == seen[-1].total == 4 * (1 + 12)  # the coarse scale, then 12 tiles
    # Every tile matches the whole picture's style at the whole picture's scale.
    assert {tile_config(cfg, t).style_size for t in plan.tiles} == {256}
    seams = seam_energy(to_tensor(result.image, torch.device("cpu")), plan)
    assert seams["ratio"] < 1.5, seams
    # Pasting the tiles without the windows' blend leaves steps: what the blend removes.
    assert max(t.width for t in plan.tiles) <= 96


def test_a_tile_is_a_single_scale_run_from_the_coarse_picture(model_avg: VGGFeatures) -> None:
    """A picture no larger than one tile is one tile: exactly the coarse scales, then one run of the
    final scale that starts from the coarse picture (scaled up) with a fresh optimiser."""
    content, style = make_image(80, 54, seed=3), make_image(64, 64, seed=4)
    cfg = preset("default", size=80, scales=2, min_size=40, tile_size=96, tile_overlap=24, **FAST)
    tiled = stylize_tiled(content, [style], cfg, model=model_avg)
    coarse = stylize(content, [style], cfg, model=model_avg, last_scale=0)
    (tile,) = final_plan(cfg, content.size).tiles
    start = coarse.image.resize(content.resize((80, 54)).size, Image.Resampling.BICUBIC)
    alone = stylize(content.resize((80, 54), Image.Resampling.LANCZOS), [style], tile_config(cfg, tile),
                    model=model_avg, init_image=start)
    assert tiled.image.tobytes() == alone.image.tobytes()


def test_tiling_settings_are_checked() -> None:
    two = dict(scales=2, min_size=64)
    with pytest.raises(ConfigError, match="starts from a coarse picture of the whole: set scales to 2"):
        preset("default", tile_size=96)
    with pytest.raises(ConfigError, match="tile_size must be a whole number from 64"):
        preset("default", tile_size=32, **two)
    with pytest.raises(ConfigError, match="tile_overlap must be a whole number from 0 to 32"):
        preset("default", tile_size=96, tile_overlap=40, **two)  # at most a third: no pixel in three tiles
    with pytest.raises(ConfigError, match="tile_passes"):
        preset("default", tile_size=96, tile_overlap=24, tile_passes=3, **two)
    with pytest.raises(ConfigError, match="not tiled"):
        final_plan(preset("default"), (100, 100))
