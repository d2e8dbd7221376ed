"""VGG feature extractor, named by layer, cut at the deepest layer a job needs.

Simonyan & Zisserman's VGG as torchvision lays out ``vgg19().features``, built from the one
description of the network in :mod:`stylequeue.engine.network`. Gatys et al. (2015) take content
and style representations from its activations.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from stylequeue.engine.network import (
    CONVENTIONS,
    POOLINGS,
    VGG19,
    Convention,
    Layer,
    Network,
    features_only,
    recognise,
)
from stylequeue.exceptions import ConfigError, WeightsError


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
    """Frozen VGG features. Input: RGB in [0, 1], (B, 3, H, W); the weights' input convention
    (torchvision's normalisation, or Caffe's BGR 0-255 less the mean) is applied inside.

    ``state_dict``: a features-only or full torchvision state dict (see network.features_only);
    ``network`` defaults to the one whose shapes the weights have.
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        pooling: str = "max",
        info: Any = None,
        network: Network | None = None,
        convention: Convention = CONVENTIONS["torchvision"],
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if network is None:
            network = recognise({k: tuple(v.shape) for k, v in features_only(state_dict).items()}) or VGG19
        self.network = network
        self.convention = convention
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
        # Per channel, in the network's channel order (see network.Convention).
        self.register_buffer("mean", torch.tensor(convention.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(convention.std).view(1, 3, 1, 1))
        self._order = list(convention.order)
        self._reorder = self._order != [0, 1, 2]
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(
        cls, loaded: _HasWeights, *, pooling: str = "max", device: torch.device | str | None = None
    ) -> "VGGFeatures":
        """Build from ``weights.load_weights(...)``'s result (anything with .state_dict and .info;
        the convention is the info's, torchvision's when it names none)."""
        name = getattr(loaded.info, "convention", None) or "torchvision"
        model = cls(loaded.state_dict, pooling=pooling, info=loaded.info, convention=CONVENTIONS[name])
        return model.to(device) if device is not None else model

    def train(self, mode: bool = True) -> "VGGFeatures":
        """Always eval: VGG19 has no dropout/batch-norm in features, but keep the promise explicit."""
        return super().train(False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the network's input (its channel order, scale, mean and std)."""
        if self._reorder:
            x = x[:, self._order]  # RGB -> BGR for Caffe weights (the order is its own inverse)
        if self.convention.scale != 1.0:
            x = x * self.convention.scale
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input -> [0, 1] RGB (unclamped)."""
        x = x * self.std + self.mean
        if self.convention.scale != 1.0:
            x = x / self.convention.scale
        return x[:, self._order] if self._reorder else x

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
