"""Named starting points: ``seed``, ``gatys`` and ``default``.

Each preset is a dict of overrides on :class:`StyleConfig`'s defaults (``default`` is those
defaults themselves), so a job spec can name a preset and override any field.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from stylequeue.engine.config import RELU_STYLE_LAYERS, StyleConfig, gatys_style_layer_weights
from stylequeue.exceptions import ConfigError

# The seed selects modules 0, 5, 10, 19, 28 (conv1_1 ... conv5_1), but torchvision's VGG19 uses
# ReLU(inplace=True) and the seed runs every module: each selected conv output is overwritten
# by the next module's in-place ReLU before any loss reads it. What the seed really matches is
# therefore relu1_1 ... relu5_1 (tests/engine/test_presets.py checks this against its loop).
_SEED_LAYERS = RELU_STYLE_LAYERS

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        # The seed document's code (yunjey/pytorch-tutorial, neural_style_transfer/main.py):
        # loss = sum_l mean((F - P)^2) + 100 * sum_l mean((F F^T - S S^T)^2) / (c h w), Adam on
        # the ImageNet-normalised image, never clamped. "sqrt_chw" Gram scaling reproduces that
        # style term exactly; space "normalized" reproduces the dynamics.
        "seed": {
            "size": 400,
            "iterations": 2000,
            "optimizer": "adam",
            "lr": 0.003,
            "betas": (0.5, 0.999),
            "space": "normalized",
            "content_layers": _SEED_LAYERS,
            "content_layer_weights": None,
            "style_layers": _SEED_LAYERS,
            "style_layer_weights": None,
            "content_weight": 1.0,
            "style_weight": 100.0,
            "tv_weight": 0.0,
            "gram_norm": "sqrt_chw",
            "loss_norm": "none",
            "style_loss": "gram",
            "init": "content",
            "pooling": "max",
            "scales": 1,
            "ema_decay": 0.0,
        },
        # Gatys, Ecker & Bethge (2015/2016): relu4_2 content, relu1_1..relu5_1 style with equal
        # paper weights (see gatys_style_layer_weights), L-BFGS, average pooling ("slightly more
        # appealing results"), white-noise start.
        "gatys": {
            "size": 512,
            "iterations": 500,
            "optimizer": "lbfgs",
            "lr": 1.0,
            "space": "pixel",
            "content_layers": ("relu4_2",),
            "content_layer_weights": None,
            "style_layers": RELU_STYLE_LAYERS,
            "style_layer_weights": gatys_style_layer_weights(),
            # The layer weights carry the paper's alpha/beta = 1e-3 already: no multiplier on top
            # (before 0.2 this preset inherited style_weight 100, a hundred times the paper's ratio).
            "content_weight": 1.0,
            "style_weight": 1.0,
            "tv_weight": 0.0,
            "gram_norm": "chw",
            "loss_norm": "none",
            "style_loss": "gram",
            "init": "noise",
            "pooling": "avg",
            "scales": 1,
            "ema_decay": 0.0,
        },
        # StyleConfig's own defaults: relative losses at Gatys's layers, Adam in pixel space from
        # the content image (chosen on real features: see StyleConfig's docstring).
        "default": {},
    }
)


def preset(name: str, **overrides: Any) -> StyleConfig:
    """The named preset with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return StyleConfig().replace(**{**PRESETS[name], **overrides})
