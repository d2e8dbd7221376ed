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


def test_a_tile_that_runs_out_of_memory_runs_as_smaller_tiles(model_avg: VGGFeatures, monkeypatch) -> None:
    """The device's memory is what CPU tests cannot have: an optimisation's forward (the one that
    keeps activations for its backward) past 100 px raises the CUDA out-of-memory error, as a GPU
    with too little free memory would. (Targets are no_grad forwards, which keep no activations.)"""
    from stylequeue.engine.tiled import run_tile

    forward = type(model_avg).forward

    def small_device(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and max(x.shape[-2:]) > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test's 100 px device)")
        return forward(self, x, *args, **kwargs)

    content, style = make_image(300, 200, seed=5), make_image(64, 64, seed=6)
    cfg = preset("default", size=300, scales=2, min_size=64, tile_size=192, tile_overlap=32, **FAST)
    plan = final_plan(cfg, content.size)
    monkeypatch.setattr(type(model_avg), "forward", small_device)
    tile = plan.tiles[0]
    result = run_tile(content, [style], cfg, plan, tile, content, model=model_avg)
    assert max(tile.width, tile.height) > 100  # it could not run whole on this device
    assert result.image.size == (tile.width, tile.height) and result.state is None and not result.stopped
    # A tile already too small to cut (under twice the smallest tile) fails as it is.
    small = cfg.replace(tile_size=120, tile_overlap=20)
    small_plan = final_plan(small, content.size)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_tile(content, [style], small, small_plan, small_plan.tiles[0], content, model=model_avg)
