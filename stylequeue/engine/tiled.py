"""Print-size pictures: coarse-to-fine up to a size that fits, then the final size tile by tile.

One GPU cannot hold VGG's activations for a 16-megapixel picture. The job then runs its coarse
scales as usual (``stylize(..., last_scale=scales - 2)``) and the final scale as overlapping tiles
(tiles.py), each an ordinary single-scale run on:

* the tile's crop of the content at the final size (the content target: the picture's detail);
* the same crop of the coarse result scaled up, as its starting image, so that every tile starts
  from one picture's layout and colours (Gatys et al. 2017 use a coarse result the same way);
* the style targets of the WHOLE style image at the WHOLE picture's scale (``style_size``), not at
  the tile's: every tile matches the same Gram matrices, so tiles do not drift apart in colour or
  texture, and brush strokes keep the size they have in an untiled picture. They are computed once
  and shared through the target cache (a job's tiles hit it).

Tiles blend with smooth windows; with ``tile_passes`` 2, a second pass over a grid shifted by half
a tile starts from the blend, which puts the remaining seams where the first pass had tile centres.
:func:`stylize_tiled` does all of it in one process (``stylequeue run``, tests); the service runs
each tile as its own GPU task (tasks/tiles.py) and the blend in another.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from stylequeue.engine.config import MIN_TILE, StyleConfig, style_side
from stylequeue.engine.images import fit_longest
from stylequeue.engine.result import Progress, StyleResult
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.tensors import to_pil, to_tensor
from stylequeue.engine.tiles import Tile, TilePlan, blend, crop_pil, plan_tiles, shifted
from stylequeue.engine.transfer import stylize
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

log = logging.getLogger(__name__)


def final_plan(config: StyleConfig, content_size: tuple[int, int], tile_pass: int = 0) -> TilePlan:
    """The grid of the final scale for a content of ``content_size`` (pass 1: shifted by half a tile)."""
    if not config.tile_size:
        raise ConfigError("the job is not tiled: set tile_size")
    width, height = fit_longest(content_size, config.size)
    plan = plan_tiles(width, height, config.tile_size, config.tile_overlap)
    return shifted(plan) if tile_pass == 1 else plan


def tile_config(config: StyleConfig, tile: Tile) -> StyleConfig:
    """What one tile runs: a single scale at the tile's own size, from a given image, with the style
    at the whole picture's scale."""
    return config.replace(size=max(tile.width, tile.height), scales=1, init="image",
                          style_size=style_side(config, config.size), tile_size=0)


def tile_inputs(content: Image.Image, start: Image.Image, plan: TilePlan, tile: Tile) -> tuple[Image.Image, Image.Image]:
    """(content crop, starting crop) of ``tile``: both images scaled to the final size first.

    ``start`` is the coarse result (first pass) or the previous pass's blend, at any size.
    """
    full = (plan.width, plan.height)
    content_full = content.convert("RGB").resize(full, Image.Resampling.LANCZOS) if content.size != full else content
    start_full = start.convert("RGB").resize(full, Image.Resampling.BICUBIC) if start.size != full else start
    return crop_pil(content_full, tile), crop_pil(start_full, tile)


def run_tile(
    content: Image.Image,
    styles: Sequence[Image.Image],
    config: StyleConfig,
    plan: TilePlan,
    tile: Tile,
    start: Image.Image,
    *,
    model: VGGFeatures,
    target_cache: TargetCache | None = None,
    **stylize_options: Any,
) -> StyleResult:
    """One tile of the final scale (see the module docstring); what a service tile task runs.

    A tile that runs out of device memory (the memory model is an estimate; another process may
    hold memory) is cut into smaller tiles and run again, rather than failing the job.
    """
    content_crop, start_crop = tile_inputs(content, start, plan, tile)
    return _run_region(content_crop, start_crop, styles, config, model=model, target_cache=target_cache,
                       **stylize_options)


def _run_region(content: Image.Image, start: Image.Image, styles: Sequence[Image.Image], config: StyleConfig, *,
                model: VGGFeatures, target_cache: TargetCache | None, **stylize_options: Any) -> StyleResult:
    region = Tile(0, 0, 0, content.width, content.height)
    try:
        return stylize(content, styles, tile_config(config, region), model=model, init_image=start,
                       target_cache=target_cache, **stylize_options)
    except torch.OutOfMemoryError:
        side = max(region.width, region.height)
        if side < 2 * MIN_TILE:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = plan_tiles(region.width, region.height, max(MIN_TILE, side // 2),
                             min(config.tile_overlap, max(MIN_TILE, side // 2) // 3))
        log.warning("a %dx%d tile ran out of device memory; running it as %d smaller tiles", region.width,
                    region.height, len(smaller.tiles))
        # The pieces start afresh: a checkpoint of the whole tile does not fit them.
        options = {k: v for k, v in stylize_options.items() if k not in ("resume", "on_checkpoint")}
        pieces = [_run_region(crop_pil(content, piece), crop_pil(start, piece), styles, config, model=model,
                              target_cache=target_cache, **options) for piece in smaller.tiles]
        whole = blend_tiles(smaller, [p.image for p in pieces])
        return replace(pieces[-1], image=whole, state=None, stopped=any(p.stopped for p in pieces))


def blend_tiles(plan: TilePlan, images: Sequence[Image.Image]) -> Image.Image:
    """The tiles' pictures (in ``plan.tiles`` order) blended into the whole picture."""
    if len(images) != len(plan.tiles):
        raise ConfigError(f"{len(images)} tile pictures for a plan of {len(plan.tiles)} tiles")
    tensors = [(tile, to_tensor(image, torch.device("cpu"))) for tile, image in zip(plan.tiles, images)]
    return to_pil(blend(tensors, plan))


def stylize_tiled(
    content: Image.Image,
    styles: Sequence[Image.Image],
    config: StyleConfig,
    *,
    model: VGGFeatures,
    callback: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    target_cache: TargetCache | None = None,
) -> StyleResult:
    """The whole tiled job in this process: coarse scales, then every tile of every pass, blended."""
    from stylequeue.engine.targets import LruTargetCache

    config.validate()
    started = time.perf_counter()
    cache = target_cache if target_cache is not None else LruTargetCache()  # one style target for all tiles
    total = config.iterations * (config.scales - 1 + config.tile_passes * len(final_plan(config, content.size).tiles))
    done = 0

    def relay(offset: int, tile: int | None, tiles: int) -> Callable[[Progress], None] | None:
        if callback is None:
            return None
        return lambda p: callback(replace(p, iteration=offset + p.iteration, total=total, tile=tile, tiles=tiles,
                                          num_scales=config.scales))

    # The coarse scales (a tiled config has at least two scales), as an untiled job runs them.
    coarse = stylize(content, styles, config, model=model, last_scale=config.scales - 2, callback=relay(0, None, 0),
                     should_stop=should_stop, target_cache=cache)
    history = list(coarse.history)
    done = coarse.state.iteration if coarse.state else 0
    start = coarse.image
    if coarse.stopped:
        return _result(coarse.image, config, history, started, coarse, stopped=True)
    for tile_pass in range(config.tile_passes):
        plan = final_plan(config, content.size, tile_pass)
        pictures = []
        for tile in plan.tiles:
            result = run_tile(content, styles, config, plan, tile, start, model=model, target_cache=cache,
                              callback=relay(done, tile.index, len(plan.tiles)), should_stop=should_stop)
            pictures.append(result.image)
            done += config.iterations
            if result.stopped:
                return _result(start, config, history, started, result, stopped=True)
        start = blend_tiles(plan, pictures)
    return _result(start, config, history, started, result, stopped=False)


def _result(image: Image.Image, config: StyleConfig, history: list, started: float, last: StyleResult,
            *, stopped: bool) -> StyleResult:
    """The whole picture's result: the coarse scales' history, the device and precision tiles ran at."""
    return StyleResult(image=image, config=config, history=history,
                       timings={"total_s": round(time.perf_counter() - started, 4)}, device=last.device,
                       precision=last.precision, stopped=stopped, state=None, weights_info=last.weights_info)
