"""VGG19 feature extractor, named by layer, cut at the deepest layer a job needs.

Simonyan & Zisserman's VGG19 as torchvision builds it (``vgg19().features``: 37 modules).
Gatys et al. (2015) take content and style representations from its activations.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from stylequeue.engine.layers import (  # noqa: F401  (re-exported: the names belong with VGG)
    LAYER_INDEX,
    LAYER_NAMES,
    POOLINGS,
    check_input_size,
    check_layers,
    min_side_for,
)
from stylequeue.exceptions import ConfigError, WeightsError

# ImageNet statistics torchvision's VGG19 was trained with (RGB, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _HasWeights(Protocol):
    state_dict: Mapping[str, torch.Tensor]
    info: Any


def _features_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a features-only dict ("0.weight") or a full VGG19 one ("features.0.weight")."""
    if any(key.startswith("features.") for key in state_dict):
        return {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
    return dict(state_dict)


class VGGFeatures(nn.Module):
    """Frozen VGG19 features. Input: RGB in [0, 1], (B, 3, H, W); ImageNet normalisation inside."""

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        pooling: str = "max",
        info: Any = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        # The same 37 modules as vgg19().features, without building (and initialising) the classifier.
        features = make_layers(cfgs["E"])
        try:
            features.load_state_dict(_features_state_dict(state_dict))
        except RuntimeError as exc:
            raise WeightsError(
                f"the weights do not fit VGG19's feature layers ({exc}); give a torchvision VGG19 "
                "state dict, full or features-only"
            ) from exc
        layers: list[nn.Module] = []
        for module in features:
            if isinstance(module, nn.MaxPool2d) and pooling == "avg":
                # Gatys et al. (2015): average pooling improves gradient flow and looks smoother.
                module = nn.AvgPool2d(kernel_size=module.kernel_size, stride=module.stride)
            elif isinstance(module, nn.ReLU):
                # Not in place, so a conv output survives when its relu is also requested.
                module = nn.ReLU(inplace=False)
            layers.append(module)
        self.layers = nn.ModuleList(layers)
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
        check_layers(layers)
        wanted = set(layers)
        last = max(LAYER_INDEX[name] for name in wanted)
        check_input_size(tuple(x.shape[-2:]), LAYER_NAMES[last])
        out: dict[str, torch.Tensor] = {}
        h = x if normalized else self.normalize(x)
        for index in range(last + 1):
            h = self.layers[index](h)
            name = LAYER_NAMES[index]
            if name in wanted:
                out[name] = h
        return out
