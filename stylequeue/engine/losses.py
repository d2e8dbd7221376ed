"""Content, style and total-variation losses (Gatys et al. 2015), batch-aware.

Each loss returns one value per batch item, shape (B,), so that images batched together
optimise independently: the sum over the batch has per-image gradients.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn


def gram_matrix(features: torch.Tensor, norm: str = "chw", weight: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of (B, C, H, W) features -> (B, C, C), in float32.

    ``norm="chw"`` divides by C*H*W so that layers and image sizes are comparable (the paper's
    1/(4 N^2 M^2) differs by a per-layer constant). ``"sqrt_chw"`` reproduces the seed's scale.
    ``weight`` (1 or B, 1, H, W) weighs each position, the positions' count becoming the weights'
    sum ("chw" only): a tile's share of a picture's Gram matrix (engine/tiled.py).
    """
    b, c, h, w = features.shape
    flat = features.float().reshape(b, c, h * w)  # (B, C, HW)
    if weight is not None:
        if norm != "chw":
            raise ValueError("weighted Gram matrices are normalised per position: use gram_norm 'chw'")
        weights = weight.float().reshape(weight.shape[0], 1, h * w)  # (1 or B, 1, HW)
        return (flat * weights) @ flat.transpose(1, 2) / (c * weights.sum(2, keepdim=True).clamp_min(1e-12))
    gram = flat @ flat.transpose(1, 2)  # (B, C, C)
    denominator = c * h * w if norm == "chw" else math.sqrt(c * h * w)
    return gram / denominator


def pool_weight(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A (1, 1, H, W) per-pixel weight map as (1, 1, h, w) weights of ``features``' positions: each
    position gets the mean weight of the pixels it covers (VGG's pooling floors odd sizes)."""
    return torch.nn.functional.interpolate(weight.float(), size=tuple(features.shape[-2:]), mode="area")


Box = tuple[int, int, int, int]


def crop_to_box(features: torch.Tensor, box: Box, image_hw: Sequence[int]) -> torch.Tensor:
    """The positions of (B, C, h, w) ``features`` of an ``image_hw`` image that lie in the pixel
    ``box`` (left, top, right, bottom), rounded outwards, at least one position each way."""
    height, width = image_hw
    h, w = features.shape[-2:]
    top, left = math.floor(box[1] * h / height), math.floor(box[0] * w / width)
    bottom = min(h, max(top + 1, math.ceil(box[3] * h / height)))
    right = min(w, max(left + 1, math.ceil(box[2] * w / width)))
    return features[..., top:bottom, left:right]


def _per_item_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dim but the batch -> (B,)."""
    return (x - target).pow(2).flatten(1).mean(1)


def _weighted_mse(x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) feature MSE -> (B,), each position weighted by ``weight`` (1 or B, 1, H, W)."""
    if weight is None:
        return _per_item_mse(x, target)
    weight = weight.float()
    squared = (x - target).pow(2) * weight
    return squared.flatten(1).sum(1) / (x.shape[1] * weight.flatten(1).sum(1)).clamp_min(1e-12)


def _relative_scale(target: torch.Tensor, relative: bool) -> torch.Tensor | None:
    """1 / the target's mean square per item, (B,): the factor that makes a loss relative."""
    if not relative:
        return None
    return 1.0 / target.float().pow(2).flatten(1).mean(1).clamp_min(1e-12)


class _FixedTargetLoss(nn.Module):
    """A loss against fixed targets, optionally relative: divided by the target's mean square.

    Relative losses are dimensionless: scaling the features by any factor (another network, or
    Caffe-convention weights whose activations are ~28x torchvision's) leaves them unchanged,
    so one set of weights means the same on every network (see StyleConfig.loss_norm).
    """

    scale: torch.Tensor | None

    def _normalised(self, per_item: torch.Tensor) -> torch.Tensor:
        return per_item if self.scale is None else per_item * self.scale

    @classmethod
    def stacked(cls, losses: Sequence["_FixedTargetLoss"]) -> "_FixedTargetLoss":
        """One loss over a batch: each buffer concatenated along the batch dimension."""
        out = copy.copy(losses[0])
        out._buffers = {name: None if value is None else torch.cat([l._buffers[name] for l in losses])
                        for name, value in losses[0]._buffers.items()}
        return out


class ContentLoss(_FixedTargetLoss):
    """Feature MSE against a fixed target (1 or B, C, H, W).

    Relative to ``mean_square`` when given instead of the target's own: a tile's content term is
    relative to its whole picture's, so that a dark tile does not weigh its content more than the
    same region of an untiled run would (engine/tiled.py).
    """

    def __init__(self, target: torch.Tensor, *, relative: bool = False, mean_square: float | None = None) -> None:
        super().__init__()
        self.register_buffer("target", target.detach())
        scale = _relative_scale(target.detach(), relative)
        if scale is not None and mean_square is not None:
            scale = torch.full_like(scale, 1.0 / max(mean_square, 1e-12))
        self.register_buffer("scale", scale)

    def forward(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalised(_weighted_mse(features.float(), self.target.float(), weight))


class StyleLoss(_FixedTargetLoss):
    """MSE between the image's Gram matrix and a fixed target Gram (1 or B, C, C)."""

    def __init__(self, target_gram: torch.Tensor, norm: str = "chw", *, relative: bool = False) -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach())
        self.register_buffer("scale", _relative_scale(target_gram.detach(), relative))
        self.norm = norm

    @classmethod
    def from_grams(
        cls, grams: Sequence[torch.Tensor], blend: Sequence[float], norm: str = "chw", *, relative: bool = False,
        shift: torch.Tensor | None = None,
    ) -> "StyleLoss":
        """Target = sum_i blend_i * G_i: several styles' Gram matrices mixed by blend weights, plus
        ``shift`` (a tile's own deviation from its picture: engine/tiled.py). A relative term keeps
        the unshifted target's scale, so every tile of a picture weighs its style alike."""
        target = torch.as_tensor(sum(w * g for w, g in zip(blend, grams)))
        loss = cls(target if shift is None else target + shift.to(target), norm, relative=relative)
        if shift is not None:
            loss.scale = _relative_scale(target.detach(), relative)
        return loss

    def forward(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalised(_per_item_mse(gram_matrix(features, self.norm, weight), self.target))


def moments(features: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, C) and second raw moment (B, C, C) of (B, C, H, W) features, in float32, each
    position weighted by ``weight`` (1 or B, 1, H, W) if given.

    Unlike covariances these mix linearly, so several styles blend by blending their moments.
    """
    b, c, h, w = features.shape
    flat = features.float().reshape(b, c, h * w)  # (B, C, HW)
    if weight is None:
        return flat.mean(2), flat @ flat.transpose(1, 2) / (h * w)
    weights = weight.float().reshape(weight.shape[0], 1, h * w)
    total = weights.sum(2).clamp_min(1e-12)  # (1 or B, 1)
    return (flat * weights).sum(2) / total, (flat * weights) @ flat.transpose(1, 2) / total.unsqueeze(2)


def _covariance(mean: torch.Tensor, srm: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(B, C, C) covariance from the moments, with ``eps`` (B,) on the diagonal for stability."""
    eye = torch.eye(srm.shape[-1], dtype=srm.dtype, device=srm.device)
    return srm - mean.unsqueeze(2) * mean.unsqueeze(1) + eps.view(-1, 1, 1) * eye


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of symmetric positive semi-definite (B, C, C) matrices (eigenvalues clamped at 0),
    in float64 (see WassersteinStyleLoss.forward)."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return vectors @ (values.clamp_min(0).sqrt().unsqueeze(-1) * vectors.transpose(-2, -1))


class WassersteinStyleLoss(_FixedTargetLoss):
    """Squared 2-Wasserstein distance between Gaussians fitted to the image's and the style's
    features (Kolkin et al. 2019; crowsonkb/style-transfer-pytorch's default): means and
    covariances, instead of Gram matrices, per layer:

        W2^2 = mean_c (mu - mu_s)^2 + (tr S + tr S_s - 2 tr (S_s^1/2 S S_s^1/2)^1/2) / C

    Relative: divided by the style's mean second moment (mean_c E[f_c^2]).
    """

    # Added to each covariance's diagonal, relative to its mean variance: eigh's gradient needs
    # distinct, positive eigenvalues, and Gram-like matrices of ReLU features are often singular.
    EPS = 1e-4

    def __init__(self, mean: torch.Tensor, srm: torch.Tensor, *, relative: bool = False) -> None:
        super().__init__()
        mean, srm = mean.detach().float(), srm.detach().float()
        variance = (srm.diagonal(dim1=1, dim2=2) - mean.pow(2)).mean(1).clamp_min(1e-12)  # (B,)
        eps = self.EPS * variance
        cov = _covariance(mean, srm, eps)
        self.register_buffer("mean", mean)  # (B, C)
        self.register_buffer("cov", cov)  # (B, C, C)
        self.register_buffer("cov_sqrt", _psd_sqrt(cov))  # float64
        self.register_buffer("eps", eps)
        scale = 1.0 / srm.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12) if relative else None
        self.register_buffer("scale", scale)

    @classmethod
    def from_moments(
        cls, targets: Sequence[tuple[torch.Tensor, torch.Tensor]], blend: Sequence[float], *, relative: bool = False
    ) -> "WassersteinStyleLoss":
        """Target moments = sum_i blend_i * (mean_i, srm_i): several styles mixed."""
        mean = sum(w * m for w, (m, _) in zip(blend, targets))
        srm = sum(w * r for w, (_, r) in zip(blend, targets))
        return cls(torch.as_tensor(mean), torch.as_tensor(srm), relative=relative)

    def forward(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        mean, srm = moments(features, weight)
        cov = _covariance(mean, srm, self.eps)
        mean_term = (mean - self.mean).pow(2).mean(1)
        # tr (S_s^1/2 S S_s^1/2)^1/2 is the sum of the square roots of that matrix's eigenvalues.
        # In float64: covariances of ReLU features have many tiny eigenvalues, whose square roots'
        # gradients float32 rounding would scramble (a batch then drifts from its solo runs).
        inner = self.cov_sqrt @ cov.double() @ self.cov_sqrt
        inner = (inner + inner.transpose(-2, -1)) / 2  # symmetric to rounding, for eigvalsh
        root_trace = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum(-1).float()
        cov_term = (self.cov.diagonal(dim1=1, dim2=2).sum(1) + cov.diagonal(dim1=1, dim2=2).sum(1)
                    - 2 * root_trace) / cov.shape[-1]
        return self._normalised(mean_term + cov_term)


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
        style: Mapping[str, tuple[StyleLoss | WassersteinStyleLoss, float]],
        *,
        content_weight: float,
        style_weight: float,
        tv_weight: float,
        box: Box | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.box = box  # the losses read only this part of the image (a tile inside its context)
        # (1, 1, H, W) over the whole image: how much each pixel's features count (a tile's blend
        # window, 0 outside its box: engine/tiled.py); pooled to each layer's positions.
        self.register_buffer("weight", None if weight is None else weight.detach().float())
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
        size = image.shape[-2:]
        weights: dict[str, torch.Tensor | None] = {k: None for k in features}
        if self.weight is not None:
            if tuple(self.weight.shape[-2:]) != tuple(size):
                raise ValueError(f"the loss weight is {tuple(self.weight.shape[-2:])}, the image {tuple(size)}")
            weights = {k: pool_weight(self.weight, v) for k, v in features.items()}
        if self.box is not None:
            features = {k: crop_to_box(v, self.box, size) for k, v in features.items()}
            weights = {k: None if v is None else crop_to_box(v, self.box, size) for k, v in weights.items()}
            image = image[..., self.box[1]:self.box[3], self.box[0]:self.box[2]]
        content = sum(
            w * self.content_losses[k](features[k], weights[k]) for k, w in self.content_layer_weights.items()
        )
        style = sum(w * self.style_losses[k](features[k], weights[k]) for k, w in self.style_layer_weights.items())
        content = self.content_weight * torch.as_tensor(content)
        style = self.style_weight * torch.as_tensor(style)
        tv = self.tv_weight * self.tv(image.float()) if self.tv_weight else torch.zeros_like(content)
        return LossTerms(total=content + style + tv, content=content, style=style, tv=tv)
