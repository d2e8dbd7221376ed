"""Content, style and total-variation losses (Gatys et al. 2015), batch-aware.

Each loss returns one value per batch item, shape (B,), so that images batched together
optimise independently: the sum over the batch has per-image gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn


def gram_matrix(features: torch.Tensor, norm: str = "chw") -> torch.Tensor:
    """Gram matrix of (B, C, H, W) features -> (B, C, C), in float32.

    ``norm="chw"`` divides by C*H*W so that layers and image sizes are comparable (the paper's
    1/(4 N^2 M^2) differs by a per-layer constant). ``"sqrt_chw"`` reproduces the seed's scale.
    """
    b, c, h, w = features.shape
    flat = features.float().reshape(b, c, h * w)  # (B, C, HW)
    gram = flat @ flat.transpose(1, 2)  # (B, C, C)
    denominator = c * h * w if norm == "chw" else math.sqrt(c * h * w)
    return gram / denominator


def _per_item_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dim but the batch -> (B,)."""
    return (x - target).pow(2).flatten(1).mean(1)


class ContentLoss(nn.Module):
    """Feature MSE against a fixed target (1 or B, C, H, W)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _per_item_mse(features.float(), self.target.float())


class StyleLoss(nn.Module):
    """MSE between the image's Gram matrix and a fixed target Gram (1 or B, C, C)."""

    def __init__(self, target_gram: torch.Tensor, norm: str = "chw") -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach())
        self.norm = norm

    @classmethod
    def from_grams(
        cls, grams: Sequence[torch.Tensor], blend: Sequence[float], norm: str = "chw"
    ) -> "StyleLoss":
        """Target = sum_i blend_i * G_i: several styles' Gram matrices mixed by blend weights."""
        target = sum(w * g for w, g in zip(blend, grams))
        return cls(torch.as_tensor(target), norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _per_item_mse(gram_matrix(features, self.norm), self.target)


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Squared total variation of (B, C, H, W) images, mean per pixel pair -> (B,)."""
    dx = (image[..., :, 1:] - image[..., :, :-1]).pow(2).flatten(1).mean(1)
    dy = (image[..., 1:, :] - image[..., :-1, :]).pow(2).flatten(1).mean(1)
    return dx + dy


class TVLoss(nn.Module):
    """Total variation: a smoothness prior (Mahendran & Vedaldi 2015), not in Gatys et al."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return tv_loss(image)


@dataclass
class LossTerms:
    """Weighted loss terms, each (B,); ``total`` is what is minimised."""

    total: torch.Tensor
    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor


class StyleTransferLoss(nn.Module):
    """total = content_weight * sum_l w_l content_l + style_weight * sum_l w_l style_l + tv_weight * tv.

    Reported ``content``/``style``/``tv`` are the weighted terms, so they add up to ``total``.
    """

    def __init__(
        self,
        content: Mapping[str, tuple[ContentLoss, float]],
        style: Mapping[str, tuple[StyleLoss, float]],
        *,
        content_weight: float,
        style_weight: float,
        tv_weight: float,
    ) -> None:
        super().__init__()
        self.content_losses = nn.ModuleDict({k: m for k, (m, _) in content.items()})
        self.style_losses = nn.ModuleDict({k: m for k, (m, _) in style.items()})
        self.content_layer_weights = {k: w for k, (_, w) in content.items()}
        self.style_layer_weights = {k: w for k, (_, w) in style.items()}
        self.content_weight = content_weight
        self.style_weight = style_weight
        self.tv_weight = tv_weight
        self.tv = TVLoss()

    @property
    def layers(self) -> list[str]:
        """Every layer the losses read, for one forward pass of VGGFeatures."""
        return list(dict.fromkeys([*self.content_losses, *self.style_losses]))

    def forward(self, features: Mapping[str, torch.Tensor], image: torch.Tensor) -> LossTerms:
        content = sum(
            w * self.content_losses[k](features[k]) for k, w in self.content_layer_weights.items()
        )
        style = sum(w * self.style_losses[k](features[k]) for k, w in self.style_layer_weights.items())
        content = self.content_weight * torch.as_tensor(content)
        style = self.style_weight * torch.as_tensor(style)
        tv = self.tv_weight * self.tv(image.float()) if self.tv_weight else torch.zeros_like(content)
        return LossTerms(total=content + style + tv, content=content, style=style, tv=tv)
