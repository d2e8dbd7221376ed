"""StyleConfig: every engine default, written once, and its validation.

The CLI, the job spec and the presets read defaults from here; nothing else repeats them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from stylequeue.engine.network import NETWORKS, POOLINGS, network
from stylequeue.exceptions import ConfigError

OPTIMIZERS = ("adam", "lbfgs")
INITS = ("content", "noise", "image")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# torch.compile modes for the VGG forward on CUDA ("reduce-overhead" adds CUDA graphs).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# How a Gram matrix of (C, H, W) features is scaled before the style MSE:
# "chw" divides by C*H*W (size-independent); "sqrt_chw" divides by sqrt(C*H*W), which makes
# mean((G - A)^2) equal the seed's mean((F F^T - S S^T)^2) / (C*H*W) exactly.
GRAM_NORMS = ("chw", "sqrt_chw")
# How each loss term is scaled: "none" is the plain MSE (Gatys et al., the seed); "relative"
# divides each term by its target's mean square, which makes it dimensionless: the same weights
# then mean the same on VGG16 and VGG19, torchvision or Caffe weights, and at any image size.
LOSS_NORMS = ("none", "relative")
# The style statistic matched per layer: Gram matrices (Gatys et al.), or means and covariances
# compared by the 2-Wasserstein distance between Gaussians (crowsonkb/style-transfer-pytorch).
STYLE_LOSSES = ("gram", "wasserstein")
TILE_STYLES = ("regional", "global")  # engine/tiled.py
# Which tensor the optimiser updates: "pixel" is RGB in [0, 1] (clamped after each step);
# "normalized" is the ImageNet-normalised tensor, unclamped, as in the seed's code.
SPACES = ("pixel", "normalized")

MAX_ITERATIONS = 100_000
# The largest float32: a weight or rate beyond it is infinity once on the device. (Smaller ones can
# still overflow a loss; the engine stops with NonFiniteLossError when one does.)
MAX_FLOAT32 = 3.4028234663852886e38
MIN_SIZE = 16
MAX_SIZE = 8192
MAX_SCALES = 10
# Smallest side a style image is scaled to, so pool4/pool5 still see a few pixels.
MIN_STYLE_SIDE = 16
# Smallest tile: below it the overlap and VGG's deepest layers leave too little of each tile.
MIN_TILE = 64


RELU_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

# Settings a checkpoint may differ in from the run that resumes it: they do not change the result.
RESUME_FREE = ("device", "precision", "compile", "progress_every", "checkpoint_every")
# Settings that may differ between the items of one batch: they act on each item's own start,
# targets, averaging or cadence, never on the shared forward pass or the shared loss weights.
BATCH_FREE = ("seed", "init", "style_blend_weights", "ema_decay", "progress_every", "checkpoint_every")


def gatys_style_layer_weights(
    style_to_content: float = 1e3, size: int = 512, channels: tuple[int, ...] = (64, 128, 256, 512, 512)
) -> tuple[float, ...]:
    """Per-layer style weights that make our normalised losses equal Gatys et al.'s (2015) ratio.

    The paper's style term per layer is w_l / (4 N^2 M^2) * sum (G - A)^2 with w_l = 1/5, which
    is w_l * N^2 / 4 * mse(G / (N M)); its content term 1/2 * sum (F - P)^2 is (N M / 2) * mse
    at relu4_2 (512 channels, (size / 8)^2 positions). Dividing by the content factor leaves
    content weight 1 and these style layer weights, for beta / alpha = ``style_to_content``.
    """
    content_factor = 512 * (size / 8) ** 2 / 2
    return tuple(style_to_content * 0.2 * c * c / 4 / content_factor for c in channels)


@dataclass(frozen=True)
class StyleConfig:
    """One style-transfer job's parameters. ``iterations`` counts steps at EACH scale.

    These defaults ARE the ``default`` preset: tune the engine's default here, in one place.
    They were chosen on real ImageNet features (bench/quality.py; the results, with pictures, in
    bench/results/quality/): Gatys et al.'s layers (content relu4_2, style relu1_1..relu5_1, max
    pooling as the network was trained) with relative losses, style weight 1, Adam in pixel space
    at lr 0.05 from the content image, 200 steps. A search of a dozen settings given the same
    seconds on three content-style pairs (``--search``) found relative losses with content relu4_2
    and max pooling ahead, their curves flat by 150-200 steps at 256 px; average pooling, the
    Wasserstein loss, EMA and coarse-to-fine scales did no better. Style weight 3 gave the lowest
    style distance, but the full run over six pairs showed it washing the content out (a cat or an
    astronaut under The Wreck of a Transport Ship), so the default is 1, which keeps it. In the
    six-pair run at 256 px (bench/results/quality/quality.md; content / style distance by
    bench/quality.py's evaluator, medians) it ends its 200 steps after 88 s at 0.47 / 0.057,
    where ``gatys`` after 100 s has 0.46 / 0.46: an eighth of the style distance at the same
    content distance, and lower on both in 4 of the 6 pairs.

    The measurements were made on a VGG16 (the only real ImageNet features that could be had
    there, with Caffe-convention input) and the default network is VGG19: what makes them carry
    over is ``loss_norm="relative"``. Every term is divided by its target's mean square, so scaling
    the features (another network, Caffe's ~28x larger activations, another image size) leaves the
    objective unchanged, and a style weight means the same on each (tests/engine/test_losses.py).
    """

    network: str = "vgg19"  # must be the weights' network (the worker's or the CLI's weights say)
    size: int = 512  # longest side of the output, pixels
    iterations: int = 200  # optimiser steps per scale
    optimizer: str = "adam"
    lr: float = 0.05  # in units of the optimised space (see ``space``)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    space: str = "pixel"
    content_layers: tuple[str, ...] = ("relu4_2",)
    content_layer_weights: tuple[float, ...] | None = None  # None: 1.0 for every layer
    style_layers: tuple[str, ...] = RELU_STYLE_LAYERS
    style_layer_weights: tuple[float, ...] | None = None  # None: 1.0 each
    content_weight: float = 1.0
    style_weight: float = 1.0
    tv_weight: float = 0.0
    gram_norm: str = "chw"  # per position: a style target means the same at any size (tiles, style_scale)
    loss_norm: str = "relative"
    style_loss: str = "gram"
    style_blend_weights: tuple[float, ...] | None = None  # None: equal; normalised to sum 1
    style_scale: float = 1.0  # style's longest side = style_scale * the output's longest side
    style_size: int | None = None  # the style's longest side in px, whatever the output's (tiles)
    original_colors: bool = False  # luminance-only transfer (Gatys et al. 2016)
    init: str = "content"
    pooling: str = "max"  # as VGG was trained; on real features avg pooling stylised less per second
    scales: int = 1  # coarse-to-fine sizes, geometric from min_size to size
    min_size: int = 128
    # Print-size pictures (engine/tiled.py): the final scale as overlapping tiles of at most
    # tile_size px a side (0: untiled), overlapping by tile_overlap px, in tile_passes grids; each
    # tile optimised inside tile_context px of the picture around it (clipped at its edges).
    tile_size: int = 0
    tile_overlap: int = 64
    tile_passes: int = 1
    tile_context: int = 64
    # "regional": a tile's Gram targets shifted by how its region differs from the whole picture
    # at the start, so the tiles match the style together as one picture does; "global": every
    # tile matches the style's Gram matrices alone (engine/tiled.py, docs/tiles.md). Gram loss only.
    tile_style: str = "regional"
    # (left, top, right, bottom) px of a single-scale image where the losses are measured; the rest
    # is context that VGG sees but no loss reads (what a tile runs: engine/tiled.py). None: all.
    loss_box: tuple[int, int, int, int] | None = None
    ema_decay: float = 0.0  # iterate averaging of the image; 0 = off
    seed: int = 0
    progress_every: int = 10
    checkpoint_every: int = 0  # 0 = never
    device: str = "auto"
    precision: str = "auto"
    compile: str = "off"  # torch.compile mode on CUDA (see COMPILE_MODES); ignored elsewhere

    def validate(self) -> "StyleConfig":
        """Raise ConfigError saying what is wrong and how to fix it; return self when valid."""
        _check_choices(self)
        _check_numbers(self)
        _check_layers(self)
        return self

    def batch_signature(self) -> dict[str, Any]:
        """The settings every item of a batch must share (all but BATCH_FREE)."""
        return {k: v for k, v in self.to_dict().items() if k not in BATCH_FREE}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StyleConfig":
        """Inverse of :meth:`to_dict`; rejects unknown keys; validates."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown style setting(s) {unknown}; valid settings are: {', '.join(sorted(known))}"
            )
        return cls().replace(**data)

    def replace(self, **changes: Any) -> "StyleConfig":
        """A validated copy with ``changes`` (lists are turned into tuples)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(
                f"unknown style setting(s) {unknown}; valid settings are: {', '.join(sorted(known))}"
            )
        coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return dataclasses.replace(self, **coerced).validate()

    @property
    def total_iterations(self) -> int:
        """Steps over all scales."""
        return self.iterations * self.scales

    @property
    def scale_sizes(self) -> list[int]:
        """The output's longest side at each scale, coarse to fine."""
        return scale_sizes(self.size, self.min_size, self.scales)

    def output_sizes(self, content_size: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        """(width, height) of the optimised image at each scale for a content of ``content_size``."""
        from stylequeue.engine.images import fit_longest  # Pillow only when sizes are asked for

        return tuple(fit_longest(content_size, side) for side in self.scale_sizes)

    def check_content_size(self, content_size: tuple[int, int], name: str) -> None:
        """ConfigError naming the image ``name`` when a scale's image would be too small for the
        deepest layer (an extreme aspect ratio: 2000x4 at 32 px is 32x1); cheap, so checked before
        anything runs."""
        net = network(self.network)
        deepest = net.deepest([*self.content_layers, *self.style_layers]).name
        for width, height in self.output_sizes(content_size):
            try:
                net.check_input_size((height, width), deepest)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None


    def check_style_size(self, style_size: tuple[int, int], name: str) -> None:
        """ConfigError naming the style image ``name`` when, resized for a scale (its longest side
        style_scale times the output's, never below MIN_STYLE_SIDE), it is too small for the
        deepest style layer."""
        from stylequeue.engine.images import fit_longest  # Pillow only when sizes are asked for

        net = network(self.network)
        deepest = net.deepest(self.style_layers).name
        for side in self.scale_sizes:
            width, height = fit_longest(style_size, style_side(self, side))
            try:
                net.check_input_size((height, width), deepest)
            except ConfigError as exc:
                raise ConfigError(f"style image {name}: {exc}") from None


def style_side(config: "StyleConfig", size: int) -> int:
    """Longest side of the style image for an output whose longest side is ``size``: ``style_size``
    when set (a tile takes the style at the whole picture's scale, not the tile's)."""
    if config.style_size is not None:
        return config.style_size
    return max(MIN_STYLE_SIDE, round(config.style_scale * size))


def scale_sizes(size: int, min_size: int, scales: int) -> list[int]:
    """Longest sides, coarse to fine, in a geometric progression ending at ``size``."""
    if scales == 1:
        return [size]
    ratio = size / min_size
    return [round(min_size * ratio ** (i / (scales - 1))) for i in range(scales)]


def _check_choices(cfg: StyleConfig) -> None:
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("init", INITS),
        ("pooling", POOLINGS),
        ("precision", PRECISIONS),
        ("compile", COMPILE_MODES),
        ("gram_norm", GRAM_NORMS),
        ("space", SPACES),
        ("network", tuple(NETWORKS)),
        ("loss_norm", LOSS_NORMS),
        ("style_loss", STYLE_LOSSES),
        ("tile_style", TILE_STYLES),
    ):
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    if not isinstance(cfg.device, str) or not cfg.device:
        raise ConfigError(f"device must be 'auto' or a torch device name like 'cuda:0', got {cfg.device!r}")
    if not isinstance(cfg.original_colors, bool):
        raise ConfigError(f"original_colors must be true or false, got {cfg.original_colors!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


def _check_weight(name: str, value: Any, *, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ConfigError(f"{name} must be {need}, got {value!r}")
    if value > MAX_FLOAT32:
        raise ConfigError(f"{name} must be at most {MAX_FLOAT32:.3g} (the largest float32), got {value!r}")


def _check_numbers(cfg: StyleConfig) -> None:
    _check_int("size", cfg.size, MIN_SIZE, MAX_SIZE)
    _check_int("iterations", cfg.iterations, 1, MAX_ITERATIONS)
    _check_int("scales", cfg.scales, 1, MAX_SCALES)
    _check_int("min_size", cfg.min_size, MIN_SIZE, MAX_SIZE)
    if cfg.scales > 1 and cfg.min_size >= cfg.size:
        raise ConfigError(
            f"min_size ({cfg.min_size}) must be below size ({cfg.size}) for a multi-scale run; "
            "lower min_size or set scales to 1"
        )
    _check_int("seed", cfg.seed, 0, 2**63 - 1)
    if cfg.style_size is not None:
        _check_int("style_size", cfg.style_size, MIN_STYLE_SIDE, MAX_SIZE)
    if cfg.tile_size:
        if cfg.scales < 2:
            raise ConfigError(
                "a tiled picture starts from a coarse picture of the whole: set scales to 2 or more "
                "(min_size: a size that fits untiled)"
            )
        _check_int("tile_size", cfg.tile_size, MIN_TILE, MAX_SIZE)
        _check_int("tile_overlap", cfg.tile_overlap, 0, cfg.tile_size // 3)
        _check_int("tile_passes", cfg.tile_passes, 1, 2)
        _check_int("tile_context", cfg.tile_context, 0, cfg.tile_size)
    if cfg.loss_box is not None:
        box = cfg.loss_box
        if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in box) \
                or not (box[0] < box[2] and box[1] < box[3]):
            raise ConfigError(f"loss_box must be [left, top, right, bottom] whole pixels, left < right and "
                              f"top < bottom, got {list(box)!r}")
        if cfg.scales != 1:
            raise ConfigError("loss_box is in one scale's pixels: set scales to 1")
    _check_int("progress_every", cfg.progress_every, 1, MAX_ITERATIONS)
    _check_int("checkpoint_every", cfg.checkpoint_every, 0, MAX_ITERATIONS)
    _check_weight("lr", cfg.lr, positive=True)
    for name in ("content_weight", "style_weight", "tv_weight"):
        _check_weight(name, getattr(cfg, name))
    _check_weight("style_scale", cfg.style_scale, positive=True)
    if cfg.style_scale > 8:
        raise ConfigError(f"style_scale must be at most 8, got {cfg.style_scale}")
    if len(cfg.betas) != 2 or not all(_finite_in(b, 0.0, 1.0) for b in cfg.betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {cfg.betas!r}")
    if not _finite_in(cfg.ema_decay, 0.0, 1.0):
        raise ConfigError(f"ema_decay must be in [0, 1) (0 turns averaging off), got {cfg.ema_decay!r}")
    if cfg.style_blend_weights is not None:
        for w in cfg.style_blend_weights:
            _check_weight("each style blend weight", w)
        if sum(cfg.style_blend_weights) <= 0:
            raise ConfigError("style_blend_weights must not all be zero")


def _finite_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and low <= value < high


def _check_layers(cfg: StyleConfig) -> None:
    for kind in ("content", "style"):
        layers = getattr(cfg, f"{kind}_layers")
        weights = getattr(cfg, f"{kind}_layer_weights")
        if not layers:
            raise ConfigError(f"{kind}_layers must name at least one {cfg.network.upper()} layer")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"{kind}_layers lists a layer twice: {list(layers)}")
        network(cfg.network).check_layers(layers, what=f"{kind} layer")
        if weights is not None:
            if len(weights) != len(layers):
                raise ConfigError(
                    f"{kind}_layer_weights has {len(weights)} values for {len(layers)} "
                    f"{kind}_layers; give one weight per layer"
                )
            for w in weights:
                _check_weight(f"each {kind} layer weight", w)


def differences(a: Mapping[str, Any], b: Mapping[str, Any], free: Sequence[str]) -> list[str]:
    """The settings, other than ``free``, in which two ``StyleConfig.to_dict()`` dicts differ."""
    return sorted(k for k in (a.keys() | b.keys()) - set(free) if a.get(k) != b.get(k))


def layer_weights(layers: tuple[str, ...], weights: tuple[float, ...] | None) -> dict[str, float]:
    """{layer: weight}, 1.0 each when no weights are given."""
    return dict(zip(layers, weights if weights is not None else (1.0,) * len(layers)))


