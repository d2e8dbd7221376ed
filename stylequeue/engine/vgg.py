"""VGG feature extractor, named by layer, cut at the deepest layer a job needs.

Simonyan & Zisserman's VGG as torchvision lays out ``vgg19().features``, built from the one
description of the network in :mod:`stylequeue.engine.network`. Gatys et al. (2015) take content
and style representations from its activations.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from stylequeue.engine.network import POOLINGS, VGG19, Layer, Network, features_only
from stylequeue.exceptions import ConfigError, WeightsError

# ImageNet statistics torchvision's VGG19 was trained with (RGB, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _HasWeights(Protocol):
    state_dict: Mapping[str, torch.Tensor]
    info: Any


def _module(layer: Layer, pooling: str) -> nn.Module:
    if layer.kind == "conv":
        return nn.Conv2d(layer.in_channels, layer.channels, kernel_size=3, padding=1)
    if layer.kind == "relu":
        # Not in place, so a conv output survives when its relu is also requested.
        return nn.ReLU(inplace=False)
    if pooling == "avg":
        # Gatys et al. (2015): average pooling improves gradient flow and looks smoother.
        return nn.AvgPool2d(kernel_size=2, stride=2)
    return nn.MaxPool2d(kernel_size=2, stride=2)


class VGGFeatures(nn.Module):
    """Frozen VGG features. Input: RGB in [0, 1], (B, 3, H, W); ImageNet normalisation inside.

    ``state_dict``: a features-only or full torchvision state dict (see network.features_only).
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        pooling: str = "max",
        info: Any = None,
        network: Network = VGG19,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.network = network
        self.layers = nn.ModuleList(_module(layer, pooling) for layer in network.layers)
        try:
            self.layers.load_state_dict(features_only(state_dict))
        except RuntimeError as exc:
            raise WeightsError(
                f"the weights do not fit {network.name.upper()}'s feature layers ({exc}); give a "
                f"torchvision {network.name.upper()} state dict, full or features-only"
            ) from exc
        self.pooling = pooling
        self.info = info
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(
        cls, loaded: _HasWeights, *, pooling: str = "max", device: torch.device | str | None = None
    ) -> "VGGFeatures":
        """Build from ``weights.load_weights(...)``'s result (anything with .state_dict and .info)."""
        model = cls(loaded.state_dict, pooling=pooling, info=loaded.info)
        return model.to(device) if device is not None else model

    def train(self, mode: bool = True) -> "VGGFeatures":
        """Always eval: VGG19 has no dropout/batch-norm in features, but keep the promise explicit."""
        return super().train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> ImageNet-normalised input."""
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised input -> [0, 1] RGB (unclamped)."""
        return x * self.std + self.mean

    def forward(
        self, x: torch.Tensor, layers: Sequence[str], *, normalized: bool = False
    ) -> dict[str, torch.Tensor]:
        """Activations {name: (B, C, h, w)} of ``layers``; runs only up to the deepest one.

        ``normalized=True`` means ``x`` is already ImageNet-normalised (the ``seed`` preset
        optimises that tensor directly, as the seed's code does).
        """
        wanted = set(layers)
        last = self.network.deepest(wanted)
        self.network.check_input_size(tuple(x.shape[-2:]), last.name)
        out: dict[str, torch.Tensor] = {}
        h = x if normalized else self.normalize(x)
        for layer in self.network.layers[: last.index + 1]:
            h = self.layers[layer.index](h)
            if layer.name in wanted:
                out[layer.name] = h
        return out
