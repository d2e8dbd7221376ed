"""What a job minimises: its inputs, set up once, and each scale's loss with its fixed targets.

Gatys et al. (2015) fix the content representation (features of the content image) and the style
representation (Gram matrices of the style image) before optimising; here both are computed once
per scale under no_grad, the style's through an optional cache shared between jobs (targets.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from PIL import Image

from stylequeue.engine import color
from stylequeue.engine.config import StyleConfig, layer_weights, style_side
from stylequeue.engine.device import ExecutionPlan, apply_backend_settings, autocast, plan_execution, resolve_device
from stylequeue.engine.images import resize_longest
from stylequeue.engine.losses import (
    ContentLoss,
    StyleLoss,
    StyleTransferLoss,
    WassersteinStyleLoss,
    crop_to_box,
    gram_matrix,
    moments,
)
from stylequeue.engine.targets import TargetCache, Targets, image_digest, style_target_key
from stylequeue.engine.tensors import memory_format, to_tensor
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError


# Where a Wasserstein style target keeps a layer's mean, beside its second moment.
MEAN_SUFFIX = ".mean"


@dataclass(frozen=True)
class TileShare:
    """A tile's share of one picture's objective (engine/tiled.py).

    ``weight`` (1, 1, H, W) over the tile's run (the tile and its context) is the tile's blend
    window inside its loss box and 0 outside: every position's content and style terms count as
    much as the blend will count its pixels, so the tiles' weighted Gram matrices add up to the
    blended picture's. ``style_shift`` (per style layer) moves the tile's Gram targets by how its
    share of the starting picture differs from the whole (``tile_style`` "regional"); None: none.
    ``content_mean_square`` (per content layer) is the whole picture's content features' mean
    square, what a relative content term divides by (None: the tile's own).
    """

    weight: torch.Tensor
    style_shift: Mapping[str, torch.Tensor] | None = None
    content_mean_square: Mapping[str, float] | None = None


@dataclass
class Problem:
    """Everything fixed for the whole job: settings, model, how it runs, and the input images."""

    config: StyleConfig
    model: VGGFeatures
    plan: ExecutionPlan
    content: Image.Image
    styles: list[Image.Image]
    blend: list[float]  # one weight per style, summing to 1
    init_image: Image.Image | None
    sizes: list[int]  # the output's longest side at each scale
    started: float = field(default_factory=time.perf_counter)
    target_cache: TargetCache | None = None
    style_digests: list[str] | None = None  # image_digest of each style, when caching
    # A tile's weights and regional shift of its Gram targets (tiled.py); None: a whole picture.
    share: TileShare | None = None


@dataclass
class Scale:
    """Everything fixed for one scale: its loss (with the targets inside) and the content's colours."""

    index: int
    objective: StyleTransferLoss
    content: torch.Tensor  # (1, 3, H, W) pixels, luminance-only when original_colors
    content_color: torch.Tensor  # (1, 3, H, W) pixels, the real colours


def set_up(
    content: Image.Image,
    styles: Sequence[Image.Image],
    config: StyleConfig,
    model: VGGFeatures,
    init_image: Image.Image | None,
    target_cache: TargetCache | None = None,
    share: TileShare | None = None,
) -> Problem:
    """Check that the inputs fit the settings and the model, and place the model on its device."""
    config.validate()
    if not styles:
        raise ConfigError("give at least one style image")
    blend = list(config.style_blend_weights or [1.0] * len(styles))
    if len(blend) != len(styles):
        raise ConfigError(
            f"{len(blend)} style blend weights for {len(styles)} style images; give one weight per style"
        )
    if config.init == "image" and init_image is None:
        raise ConfigError("init is 'image' but no initial image was given; pass one or choose init 'content'")
    shift = share.style_shift if share is not None else None
    if shift is not None and (config.style_loss != "gram" or set(shift) != set(config.style_layers)):
        raise ConfigError("a style shift is one Gram matrix per style layer, for the Gram style loss")
    if config.init != "image" and init_image is not None:
        raise ConfigError(f"an initial image was given but init is {config.init!r}; set init to 'image'")
    if model.pooling != config.pooling:
        raise ConfigError(
            f"the model was built with {model.pooling} pooling but the config asks for {config.pooling}; "
            "build VGGFeatures with pooling=config.pooling"
        )
    if model.network.name != config.network:
        raise ConfigError(
            f"the settings are for {config.network} but the weights are {model.network.name}'s; set "
            f"network to {model.network.name} (its layers are: {', '.join(model.network.names)}) "
            "or give other weights"
        )
    device = next(model.parameters()).device if config.device == "auto" else resolve_device(config.device)
    plan = plan_execution(device, config.precision, config.compile)
    apply_backend_settings(plan)
    model.to(device)
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    return Problem(
        config=config,
        model=model,
        plan=plan,
        content=content.convert("RGB"),
        styles=[s.convert("RGB") for s in styles],
        blend=[w / sum(blend) for w in blend],
        init_image=init_image.convert("RGB") if init_image is not None else None,
        sizes=config.scale_sizes,
        target_cache=target_cache,
        style_digests=[image_digest(s) for s in styles] if target_cache is not None else None,
        share=share,
    )


def prepare_scale(problem: Problem, index: int) -> Scale:
    """Resize the inputs for scale ``index`` and compute its fixed targets once, under no_grad."""
    cfg, model, plan = problem.config, problem.model, problem.plan
    content_color = to_tensor(resize_longest(problem.content, problem.sizes[index]), plan.device)
    content = content_color
    content_luma = None
    if cfg.original_colors:
        content_luma = color.luminance(content_color)
        content = color.as_gray_rgb(content_luma)
    with torch.no_grad(), autocast(plan):
        content_feats = model(memory_format(content, plan), cfg.content_layers)
    box, share = cfg.loss_box, problem.share
    if share is not None and tuple(share.weight.shape[-2:]) != tuple(content.shape[-2:]):
        raise ConfigError(f"a tile's weights are {tuple(share.weight.shape[-2:])} px, its run "
                          f"{tuple(content.shape[-2:])}: make them for this tile's region")
    if box is not None:
        height, width = content.shape[-2:]
        if box[2] > width or box[3] > height:
            raise ConfigError(f"loss_box {list(box)} reaches past the {width}x{height} image")
        content_feats = {k: crop_to_box(v, box, (height, width)) for k, v in content_feats.items()}
    grams = [_style_targets(problem, i, problem.sizes[index], content_luma) for i in range(len(problem.styles))]
    relative = cfg.loss_norm == "relative"
    picture_ms = share.content_mean_square if share is not None and share.content_mean_square else {}
    content_terms = {
        name: (ContentLoss(content_feats[name].float(), relative=relative, mean_square=picture_ms.get(name)), w)
        for name, w in layer_weights(cfg.content_layers, cfg.content_layer_weights).items()
    }
    style_terms = {
        name: (_style_loss(cfg, grams, name, problem.blend, share.style_shift if share else None), w)
        for name, w in layer_weights(cfg.style_layers, cfg.style_layer_weights).items()
    }
    objective = StyleTransferLoss(
        content_terms,
        style_terms,
        content_weight=cfg.content_weight,
        style_weight=cfg.style_weight,
        tv_weight=cfg.tv_weight,
        box=box,
        weight=None if share is None else share.weight.to(plan.device),
    )
    return Scale(index=index, objective=objective, content=content, content_color=content_color)


def _style_loss(cfg: StyleConfig, targets: list[Targets], layer: str, blend: list[float],
                shift: Mapping[str, torch.Tensor] | None = None) -> StyleLoss | WassersteinStyleLoss:
    """The style term of ``layer`` against the blend of every style's targets (plus its shift)."""
    relative = cfg.loss_norm == "relative"
    if cfg.style_loss == "wasserstein":
        pairs = [(t[f"{layer}{MEAN_SUFFIX}"], t[layer]) for t in targets]
        return WassersteinStyleLoss.from_moments(pairs, blend, relative=relative)
    return StyleLoss.from_grams([t[layer] for t in targets], blend, cfg.gram_norm, relative=relative,
                                shift=None if shift is None else shift[layer])


def _style_targets(problem: Problem, style: int, size: int, content_luma: torch.Tensor | None) -> Targets:
    """Style ``style``'s targets at output size ``size``, via the job's cache if any: per layer its
    (1, C, C) Gram matrix, or for the Wasserstein loss its second moment (1, C, C) under the
    layer's name and its mean (1, C) under ``layer + MEAN_SUFFIX``."""
    cfg, plan = problem.config, problem.plan
    key = None
    if problem.target_cache is not None and problem.style_digests is not None:
        stats = None
        if content_luma is not None:
            stats = (float(content_luma.mean().item()), float(content_luma.std().item()))
        key = style_target_key(problem.style_digests[style], cfg, problem.model.info, size,
                               precision=plan.precision, device_type=plan.device.type, luminance_stats=stats)
        cached = problem.target_cache.get(key) if key is not None else None
        if cached is not None:
            return {name: value.to(plan.device) for name, value in cached.items()}
    # The style keeps its own aspect ratio; only its longest side follows the output's.
    pixels = to_tensor(resize_longest(problem.styles[style], style_side(cfg, size)), plan.device)
    if content_luma is not None:
        pixels = color.as_gray_rgb(color.match_luminance(color.luminance(pixels), content_luma))
    with torch.no_grad():
        with autocast(plan):
            features = problem.model(memory_format(pixels, plan), cfg.style_layers)
        # Outside autocast: targets are float32 (gram_matrix and moments cast before their matmul).
        targets: Targets = {}
        for name in cfg.style_layers:
            if cfg.style_loss == "wasserstein":
                targets[f"{name}{MEAN_SUFFIX}"], targets[name] = moments(features[name])
            else:
                targets[name] = gram_matrix(features[name], cfg.gram_norm)
    if key is not None and problem.target_cache is not None:
        problem.target_cache.put(key, targets)
    return targets


def stack_objectives(objectives: Sequence[StyleTransferLoss]) -> StyleTransferLoss:
    """One loss over a batch: each layer's targets concatenated along the batch dimension.

    Weights and layers come from the first objective; the items of a batch share them.
    """
    first = objectives[0]
    if any(o.weight is not None for o in objectives):
        raise ConfigError("a tile's run is not batched with others: run each tile alone")
    content = {
        name: (ContentLoss.stacked([o.content_losses[name] for o in objectives]), w)
        for name, w in first.content_layer_weights.items()
    }  # targets (B, C, h, w)
    style = {
        name: (type(first.style_losses[name]).stacked([o.style_losses[name] for o in objectives]), w)
        for name, w in first.style_layer_weights.items()
    }  # targets (B, C, C), or means (B, C) and covariances
    return StyleTransferLoss(content, style, content_weight=first.content_weight,
                             style_weight=first.style_weight, tv_weight=first.tv_weight, box=first.box)
