"""Print-size pictures: coarse-to-fine up to a size that fits, then the final size tile by tile.

One GPU cannot hold VGG's activations for a 16-megapixel picture. The job then runs its coarse
scales as usual (``stylize(..., last_scale=scales - 2)``) and the final scale as overlapping tiles
(tiles.py), each an ordinary single-scale run on the tile grown by ``tile_context`` px of the
picture around it, with the losses read on the tile alone and only the tile's pixels optimised
(``loss_box``): VGG's deep layers see a hundred pixels and more around each position, and without
that context a tile's border features see zero padding where the picture goes on. The context is
the starting picture, held still. Each tile runs from:

* the region's crop of the content at the final size (the content target: the picture's detail);
* the same crop of the coarse result scaled up, as its starting image, so that every tile starts
  from one picture's layout and colours (Gatys et al. 2017 use a coarse result the same way);
  both are resampled from their sources' share of the region only (``region_inputs``);
* the style targets of the WHOLE style image at the WHOLE picture's scale (``style_size``), not at
  the tile's, so brush strokes keep the size they have in an untiled picture; computed once and
  shared through the target cache.

And the tiles share ONE objective, the untiled picture's, as far as independent runs can
(objective.TileShare, docs/tiles.md has each part measured):

* each tile weighs its positions by its blend window (``region_weight``): its content and style
  terms count a position as much as the blend will count its pixel, so the tiles' weighted Gram
  matrices add up to the blended picture's. Weighed alike, the overlaps would count twice;
* with ``tile_style="regional"`` (the default), each tile's Gram targets are shifted by its own
  share of the starting picture's Gram matrices less the picture's (:func:`tile_share`). An
  untiled run matches the style's Gram matrices over the whole picture, where a dark region and a
  bright sky share out the painting's palette; a tile asked to match them alone ("global") must
  hold the whole palette in its dark corner, and gives up its content for it. The shifts, weighted
  as the blend weighs the tiles, add up to zero, so the tiles still match the style together;
* a relative content term divides by the whole picture's mean square, not the tile's.

What the tiles need of the whole picture (:class:`PictureStats`) is summed from every tile's
weighted share, one no-grad forward of each tile's region: never a forward of the whole.

Tiles blend with the same windows; with ``tile_passes`` 2, a second pass over a grid shifted by
half a tile starts from the blend, which puts the remaining seams where the first pass had tile
centres. :func:`stylize_tiled` does all of it in one process (``stylequeue run``, tests); the
service runs each tile as its own GPU task (tasks/tiles.py) and the blend in another.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from stylequeue.engine.config import MIN_TILE, StyleConfig, style_side
from stylequeue.engine.images import fit_longest
from stylequeue.engine.losses import gram_matrix, pool_weight
from stylequeue.engine.objective import TileShare
from stylequeue.engine.result import Progress, StyleResult
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.tensors import to_pil, to_tensor
from stylequeue.engine.tiles import Tile, TilePlan, blend, crop_pil, plan_tiles, shifted, window
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


def tile_region(plan: TilePlan, tile: Tile, context: int) -> Tile:
    """``tile`` grown by ``context`` px on every side, within the picture: what VGG sees of it."""
    return Tile(tile.index, max(0, tile.x0 - context), max(0, tile.y0 - context),
                min(plan.width, tile.x1 + context), min(plan.height, tile.y1 + context))


def _region_and_box(plan: TilePlan, tile: Tile, context: int) -> tuple[Tile, Tile]:
    """(``tile`` with its context, ``tile`` in that region's own pixels)."""
    region = tile_region(plan, tile, context)
    return region, Tile(0, tile.x0 - region.x0, tile.y0 - region.y0, tile.x1 - region.x0, tile.y1 - region.y0)


def tile_config(config: StyleConfig, plan: TilePlan, tile: Tile) -> StyleConfig:
    """What one tile runs: a single scale over the tile and its context, from a given image, the
    losses read on the tile only, with the style at the whole picture's scale."""
    region, inner = _region_and_box(plan, tile, config.tile_context)
    return config.replace(size=max(region.width, region.height), scales=1, init="image",
                          style_size=style_side(config, config.size), tile_size=0,
                          loss_box=None if region == tile else inner.box)


def region_inputs(content: Image.Image, start: Image.Image, config: StyleConfig, plan: TilePlan,
                  tile: Tile) -> tuple[Image.Image, torch.Tensor]:
    """(content, starting pixels (1, 3, h, w)) of ``tile``'s region at the final size, each resampled
    from its source's share only: a print-size picture is never resized whole. ``start`` is the
    coarse result or the previous pass's blend, at any size."""
    full, region = (plan.height, plan.width), tile_region(plan, tile, config.tile_context)
    crop = _resize_region(content, full, region, Image.Resampling.LANCZOS)
    return crop, to_tensor(_resize_region(start, full, region, Image.Resampling.BICUBIC), torch.device("cpu"))


def _resize_region(image: Image.Image, size: tuple[int, int], region: Tile,
                   resample: Image.Resampling) -> Image.Image:
    """``image.resize`` to an (H, W) ``size``, cut to ``region`` (PIL's ``box`` maps the same pixels)."""
    height, width = size
    if image.size == (width, height):
        return crop_pil(image.convert("RGB"), region)
    sx, sy = image.width / width, image.height / height
    box = (region.x0 * sx, region.y0 * sy, region.x1 * sx, region.y1 * sy)
    return image.convert("RGB").resize((region.width, region.height), resample, box=box)


def region_weight(plan: TilePlan, tile: Tile, context: int, window_in_box: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 1, h, w) over ``tile``'s region: its blend window inside the tile, 0 in the context; the
    weight of every position of its run (objective.TileShare). ``window_in_box`` replaces the
    plan's window (a piece of a tile that ran out of memory)."""
    region, inner = _region_and_box(plan, tile, context)
    weight = torch.zeros(1, 1, region.height, region.width)
    weight[..., inner.y0:inner.y1, inner.x0:inner.x1] = window(tile, plan) if window_in_box is None else window_in_box
    return weight


@dataclass(frozen=True)
class PictureStats:
    """What the tiles of one picture measure together and each needs: the starting picture's Gram
    matrices per style layer (regional style only) and the content's features' mean square per
    content layer (relative losses only), each the sum of the tiles' weighted shares."""

    grams: dict[str, torch.Tensor] | None = None
    content_mean_square: dict[str, float] | None = None


def style_share(pixels: torch.Tensor, weight: torch.Tensor, config: StyleConfig,
                model: VGGFeatures) -> dict[str, tuple[torch.Tensor, float]]:
    """Per style layer, the weighted Gram matrix (1, C, C) of a tile's starting ``pixels`` (1, 3,
    h, w) over its region, weighted as its run weighs it, and its weights' sum."""
    return _shares(pixels, weight, config.style_layers, model,
                   lambda features, pooled: gram_matrix(features, config.gram_norm, pooled))


def content_share(content: torch.Tensor, weight: torch.Tensor, config: StyleConfig,
                  model: VGGFeatures) -> dict[str, tuple[float, float]]:
    """Per content layer, the weighted mean square of a tile's content features over its region
    (``content`` (1, 3, h, w)), and its weights' sum."""
    return _shares(content, weight, config.content_layers, model,
                   lambda features, pooled: float((features.float().pow(2) * pooled).sum())
                   / (features.shape[1] * float(pooled.sum())))


def _shares(pixels: torch.Tensor, weight: torch.Tensor, layers: Sequence[str], model: VGGFeatures,
            measure: Callable[[torch.Tensor, torch.Tensor], Any]) -> dict[str, tuple[Any, float]]:
    """``measure(features, weights)`` of every layer, and its weights' sum, from one no-grad forward."""
    device = next(model.parameters()).device
    with torch.no_grad():
        features = model(pixels.to(device), layers)
    out = {}
    for name in layers:
        pooled = pool_weight(weight.to(device), features[name])
        out[name] = (measure(features[name], pooled), float(pooled.sum()))
    return out


def picture_stats(content: Image.Image, start: Image.Image, plan: TilePlan, config: StyleConfig,
                  model: VGGFeatures) -> PictureStats:
    """The whole picture's :class:`PictureStats`, from every tile's weighted shares weighted by
    their weights' sums (which add up to the picture's positions): no forward of the whole."""
    if not regional(config) and config.loss_norm != "relative":
        return PictureStats()
    grams: dict[str, torch.Tensor] = {}
    squares: dict[str, float] = {}
    masses: dict[tuple[str, str], float] = {}
    for tile in plan.tiles:
        crop, pixels = region_inputs(content, start, config, plan, tile)
        weight = region_weight(plan, tile, config.tile_context)
        own_grams = style_share(pixels, weight, config, model) if regional(config) else {}
        own_squares = (content_share(to_tensor(crop, torch.device("cpu")), weight, config, model)
                       if config.loss_norm == "relative" else {})
        for name, (gram, mass) in own_grams.items():
            grams[name] = grams.get(name, 0) + mass * gram
            masses["style", name] = masses.get(("style", name), 0.0) + mass
        for name, (square, mass) in own_squares.items():
            squares[name] = squares.get(name, 0.0) + mass * square
            masses["content", name] = masses.get(("content", name), 0.0) + mass
    return PictureStats({n: g / masses["style", n] for n, g in grams.items()} if grams else None,
                        {n: v / masses["content", n] for n, v in squares.items()} if squares else None)


def regional(config: StyleConfig) -> bool:
    """Whether a tile's style targets are shifted by its region (see the module docstring): Gram
    losses only (a shift of Wasserstein moments is not written) and not luminance-only transfer,
    whose targets follow each region's luminance already."""
    return config.tile_style == "regional" and config.style_loss == "gram" and not config.original_colors


def tile_share(pixels: torch.Tensor, weight: torch.Tensor, config: StyleConfig, model: VGGFeatures,
               picture: PictureStats) -> TileShare:
    """A tile's weights, the picture's content mean squares and, with regional style, its shift:
    its own share's start Grams less the picture's, so that the tiles' targets, weighted as the
    blend weighs them, add up to the style's."""
    shift = None
    if picture.grams is not None:
        own = style_share(pixels, weight, config, model)
        shift = {name: own[name][0] - picture.grams[name].to(own[name][0]) for name in own}
    return TileShare(weight, shift, picture.content_mean_square)


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
    picture: PictureStats | None = None,
    **stylize_options: Any,
) -> StyleResult:
    """One tile of the final scale (see the module docstring); what a service tile task runs.
    Its image is the tile's pixels only (the context is cut off). ``picture`` is
    :func:`picture_stats`, computed here when not given (a tile task computes it on its own: one
    no-grad forward per tile of the plan, a few per cent of its steps).

    A tile that runs out of device memory (the memory model is an estimate; another process may
    hold memory) is cut into smaller tiles and run again, rather than failing the job.
    """
    if picture is None:
        picture = picture_stats(content, start, plan, config, model)
    return _run_box(content, start, styles, config, plan, tile, None, model=model, target_cache=target_cache,
                    picture=picture, **stylize_options)


def _run_box(content: Image.Image, start: Image.Image, styles: Sequence[Image.Image], config: StyleConfig,
             plan: TilePlan, tile: Tile, window_in_box: torch.Tensor | None, *, model: VGGFeatures,
             target_cache: TargetCache | None, picture: PictureStats, **stylize_options: Any) -> StyleResult:
    region, inner = _region_and_box(plan, tile, config.tile_context)
    crop, pixels = region_inputs(content, start, config, plan, tile)
    weight = region_weight(plan, tile, config.tile_context, window_in_box)
    try:
        result = stylize(crop, styles, tile_config(config, plan, tile), model=model, init_image=to_pil(pixels),
                         target_cache=target_cache,
                         share=tile_share(pixels, weight, config, model, picture), **stylize_options)
        return replace(result, image=crop_pil(result.image, inner))
    except torch.OutOfMemoryError:
        side = max(tile.width, tile.height)
        if side < 2 * MIN_TILE:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        piece_side = max(MIN_TILE, side // 2)
        smaller = plan_tiles(tile.width, tile.height, piece_side, min(config.tile_overlap, piece_side // 3))
        log.warning("a %dx%d tile ran out of device memory; running it as %d smaller tiles", tile.width,
                    tile.height, len(smaller.tiles))
        # The pieces start afresh: a checkpoint of the whole tile does not fit them.
        rest = {k: v for k, v in stylize_options.items() if k not in ("resume", "on_checkpoint")}
        whole = weight[..., inner.y0:inner.y1, inner.x0:inner.x1]  # the tile's window
        pieces = [_run_box(content, start, styles, config, plan,
                           Tile(p.index, tile.x0 + p.x0, tile.y0 + p.y0, tile.x0 + p.x1, tile.y0 + p.y1),
                           whole[..., p.y0:p.y1, p.x0:p.x1] * window(p, smaller),
                           model=model, target_cache=target_cache, picture=picture, **rest)
                  for p in smaller.tiles]
        image = blend_tiles(smaller, [p.image for p in pieces])
        return replace(pieces[-1], image=image, state=None, stopped=any(p.stopped for p in pieces))


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
        grams = picture_stats(content, start, plan, config, model)  # once per pass
        pictures = []
        for tile in plan.tiles:
            result = run_tile(content, styles, config, plan, tile, start, model=model, target_cache=cache, picture=grams,
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
