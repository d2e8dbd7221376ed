"""Print-size pictures: coarse-to-fine up to a size that fits, then the final size tile by tile.

One GPU cannot hold VGG's activations for a 16-megapixel picture. The job then runs its coarse
scales as usual (``stylize(..., last_scale=scales - 2)``) and the final scale as overlapping tiles
(tiles.py), each an ordinary single-scale run on the tile grown by ``tile_context`` px of the
picture around it, with the losses read on the tile alone and only the tile's pixels optimised
(``loss_box``): VGG's deep layers see a hundred pixels and more around each position, and without
that context a tile's border features see zero padding where the picture goes on. The context is
the starting picture, held still: the neighbours' tiles change it meanwhile, so the closer a
position is to a tile's edge (relative to the receptive field of the layer) the less its features
in the blend are those its tile optimised. Tiles far larger than VGG's receptive fields (print
sizes: 2048 px tiles against relu5_1's 156 px) match an untiled run closely; tiles about as small
as the receptive field do not (docs/tiles.md has the measurements). The run starts from:

* the region's crop of the content at the final size (the content target: the picture's detail);
* the same crop of the coarse result scaled up, as its starting image, so that every tile starts
  from one picture's layout and colours (Gatys et al. 2017 use a coarse result the same way);
* the style targets of the WHOLE style image at the WHOLE picture's scale (``style_size``), not at
  the tile's: every tile matches the same Gram matrices, so tiles do not drift apart in colour or
  texture, and brush strokes keep the size they have in an untiled picture. They are computed once
  and shared through the target cache (a job's tiles hit it).
* with ``tile_style="regional"`` (the default), each tile's Gram targets shifted by how its own
  region differs from the whole picture in the starting image: G_tile(start) - mean over tiles of
  G_tile(start), per style layer (:func:`style_shift`). An untiled run matches the style's Gram
  matrices over the whole picture, where a dark region and a bright sky share out the painting's
  palette; a tile asked to match them alone ("global") must hold the whole palette in its dark
  corner, and gives up its content for it: on a picture whose colours change across it, 12
  global tiles doubled the content distance of an untiled run, regional ones matched it
  (docs/tiles.md). The shifts average to zero over the tiles, so the tiles still match the style
  together.

Tiles blend with smooth windows; with ``tile_passes`` 2, a second pass over a grid shifted by half
a tile starts from the blend, which puts the remaining seams where the first pass had tile centres.
:func:`stylize_tiled` does all of it in one process (``stylequeue run``, tests); the service runs
each tile as its own GPU task (tasks/tiles.py) and the blend in another.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image

from stylequeue.engine.config import MIN_TILE, StyleConfig, style_side
from stylequeue.engine.images import fit_longest
from stylequeue.engine.result import Progress, StyleResult
from stylequeue.engine.targets import TargetCache
from stylequeue.engine.tensors import to_pil, to_tensor
from stylequeue.engine.losses import crop_to_box, gram_matrix
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


def box_grams(image: Image.Image, plan: TilePlan, tile: Tile, config: StyleConfig,
              model: VGGFeatures) -> dict[str, torch.Tensor]:
    """Per style layer, the Gram matrix of ``tile``'s part of the final-size picture ``image``,
    seen as its tile run sees it (inside its context, cut to the tile)."""
    region, inner = _region_and_box(plan, tile, config.tile_context)
    pixels = to_tensor(crop_pil(image, region), next(model.parameters()).device)
    with torch.no_grad():
        features = model(pixels, config.style_layers)
    return {name: gram_matrix(crop_to_box(features[name], inner.box, pixels.shape[-2:]), config.gram_norm)
            for name in config.style_layers}


def picture_grams(start: Image.Image, plan: TilePlan, config: StyleConfig,
                  model: VGGFeatures) -> dict[str, torch.Tensor] | None:
    """The starting picture's Gram matrices as its tiles see it: the mean of every tile's
    :func:`box_grams`, weighted by area. None where the style is not regional (nothing to shift)."""
    if not regional(config):
        return None
    total: dict[str, torch.Tensor] = {}
    for tile in plan.tiles:
        for name, gram in box_grams(start, plan, tile, config, model).items():
            total[name] = total.get(name, 0) + tile.width * tile.height * gram
    area = sum(t.width * t.height for t in plan.tiles)
    return {name: gram / area for name, gram in total.items()}


def regional(config: StyleConfig) -> bool:
    """Whether a tile's style targets are shifted by its region (see the module docstring): Gram
    losses only (a shift of Wasserstein moments is not written) and not luminance-only transfer,
    whose targets follow each region's luminance already."""
    return config.tile_style == "regional" and config.style_loss == "gram" and not config.original_colors


def style_shift(start: Image.Image, plan: TilePlan, tile: Tile, config: StyleConfig, model: VGGFeatures,
                picture: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """``tile``'s regional shift of its Gram targets: its own start Grams less the picture's."""
    if picture is None:
        return None
    own = box_grams(start, plan, tile, config, model)
    return {name: own[name] - picture[name].to(own[name]) for name in own}


def full_size_inputs(content: Image.Image, start: Image.Image, plan: TilePlan) -> tuple[Image.Image, Image.Image]:
    """(content, starting picture) at the final size, from which every tile is cut.

    ``start`` is the coarse result (first pass) or the previous pass's blend, at any size.
    """
    full = (plan.width, plan.height)
    content_full = content.convert("RGB").resize(full, Image.Resampling.LANCZOS) if content.size != full else content
    start_full = start.convert("RGB").resize(full, Image.Resampling.BICUBIC) if start.size != full else start
    return content_full, start_full


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
    picture: Mapping[str, torch.Tensor] | None = None,
    **stylize_options: Any,
) -> StyleResult:
    """One tile of the final scale (see the module docstring); what a service tile task runs.
    Its image is the tile's pixels only (the context is cut off). ``picture`` is
    :func:`picture_grams` of the full-size start, computed here when not given (a tile task
    computes it on its own: one no-grad forward per tile of the plan, a few per cent of its steps).

    A tile that runs out of device memory (the memory model is an estimate; another process may
    hold memory) is cut into smaller tiles and run again, rather than failing the job.
    """
    content_full, start_full = full_size_inputs(content, start, plan)
    if picture is None:
        picture = picture_grams(start_full, plan, config, model)
    return _run_box(content_full, start_full, styles, config, plan, tile, model=model, target_cache=target_cache,
                    picture=picture, **stylize_options)



def _run_box(content: Image.Image, start: Image.Image, styles: Sequence[Image.Image], config: StyleConfig,
             plan: TilePlan, tile: Tile, *, model: VGGFeatures, target_cache: TargetCache | None,
             picture: Mapping[str, torch.Tensor] | None, **stylize_options: Any) -> StyleResult:
    region, inner = _region_and_box(plan, tile, config.tile_context)
    try:
        result = stylize(crop_pil(content, region), styles, tile_config(config, plan, tile), model=model,
                         init_image=crop_pil(start, region), target_cache=target_cache,
                         style_shift=style_shift(start, plan, tile, config, model, picture), **stylize_options)
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
        options = {k: v for k, v in stylize_options.items() if k not in ("resume", "on_checkpoint")}
        pieces = [_run_box(content, start, styles, config, plan,
                           Tile(p.index, tile.x0 + p.x0, tile.y0 + p.y0, tile.x0 + p.x1, tile.y0 + p.y1),
                           model=model, target_cache=target_cache, picture=picture, **options)
                  for p in smaller.tiles]
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
        grams = picture_grams(full_size_inputs(content, start, plan)[1], plan, config, model)  # once per pass
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
