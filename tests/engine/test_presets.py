"""Presets carry their settings, and ``seed`` reproduces the seed document's optimisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers
from PIL import Image
from torchvision import transforms

from stylequeue.engine import PRESETS, StyleConfig, preset, stylize
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError

RELU_1 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def test_seed_preset_carries_the_seed_settings() -> None:
    cfg = preset("seed")
    assert (cfg.size, cfg.iterations, cfg.optimizer, cfg.lr, cfg.betas) == (400, 2000, "adam", 0.003, (0.5, 0.999))
    assert cfg.content_layers == cfg.style_layers == RELU_1
    assert (cfg.content_weight, cfg.style_weight, cfg.tv_weight) == (1.0, 100.0, 0.0)
    assert cfg.content_layer_weights is None and cfg.style_layer_weights is None
    assert (cfg.init, cfg.pooling, cfg.space, cfg.gram_norm, cfg.scales) == (
        "content", "max", "normalized", "sqrt_chw", 1)


def test_gatys_preset_carries_the_papers_settings() -> None:
    cfg = preset("gatys")
    assert cfg.content_layers == ("relu4_2",) and cfg.style_layers == RELU_1
    assert (cfg.optimizer, cfg.pooling, cfg.init, cfg.space) == ("lbfgs", "avg", "noise", "pixel")
    # Equal paper weights 1/5 become C^2-proportional weights on size-normalised Gram MSEs.
    w = cfg.style_layer_weights
    assert w is not None and w[1] / w[0] == pytest.approx(4) and w[3] == w[4]


def test_default_preset_is_style_config_defaults_and_overrides_apply() -> None:
    assert PRESETS["default"] == {} and preset("default") == StyleConfig()
    cfg = preset("gatys", size=64, iterations=3, style_layers=["relu1_1"], style_layer_weights=None)
    assert (cfg.size, cfg.iterations, cfg.style_layers, cfg.optimizer) == (64, 3, ("relu1_1",), "lbfgs")
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*seed"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown style setting"):
        preset("seed", sise=3)


def _seed_loop(content: torch.Tensor, style: torch.Tensor, state_dict: dict, steps: int) -> list[float]:
    """The seed's main loop (yunjey/pytorch-tutorial neural_style_transfer/main.py), re-created
    faithfully: torchvision's 37 modules with in-place ReLUs, targets recomputed every step,
    gradients for the weights, Adam on the ImageNet-normalised tensor. Inputs: (1, 3, H, W) in [0, 1]."""
    vgg = make_layers(cfgs["E"])  # == torchvision.models.vgg19().features, minus the classifier's set-up
    vgg.load_state_dict(state_dict)
    vgg.eval()
    select = ["0", "5", "10", "19", "28"]

    def features(x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, layer in vgg._modules.items():
            x = layer(x)
            if name in select:
                out.append(x)
        return out

    normalize = transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    content, style = normalize(content[0]).unsqueeze(0), normalize(style[0]).unsqueeze(0)
    target = content.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([target], lr=0.003, betas=[0.5, 0.999])
    losses = []
    for _ in range(steps):
        target_features, content_features, style_features = features(target), features(content), features(style)
        style_loss = 0
        content_loss = 0
        for f1, f2, f3 in zip(target_features, content_features, style_features):
            content_loss += torch.mean((f1 - f2) ** 2)
            _, c, h, w = f1.size()
            f1 = f1.view(c, h * w)
            f3 = f3.view(c, h * w)
            f1 = torch.mm(f1, f1.t())
            f3 = torch.mm(f3, f3.t())
            style_loss += torch.mean((f1 - f3) ** 2) / (c * h * w)
        loss = content_loss + 100 * style_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def test_seed_preset_reproduces_the_seed_loop(
    vgg_state_dict: dict, model_max: VGGFeatures, content_image: Image.Image
) -> None:
    """Same images, same random weights, 5 steps: the losses agree to 1e-5 relative.

    The style image already has the content's shape (48 x 32), so the seed's resize to the
    content's (transposed) shape and ours to the same longest side both leave it unchanged.
    """
    from tests.conftest import make_image  # noqa: PLC0415 - shared helper, not a fixture

    style = make_image(48, 32, seed=7)
    steps = 5
    expected = _seed_loop(_tensor(content_image), _tensor(style), vgg_state_dict, steps)
    cfg = preset("seed", size=48, iterations=steps, progress_every=1)
    history = stylize(content_image, [style], cfg, model=model_max).history
    ours = [h["loss"] for h in history]
    assert len(ours) == steps
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert expected[-1] < expected[0]  # the seed's loop itself makes progress
