"""Luminance-only transfer, to keep the content's original colours.

Gatys, Bethge, Hertzmann & Shechtman (2016), "Preserving color in neural artistic style
transfer", section 3: run style transfer on the luminance channel only (style luminance
first matched to the content's mean and spread), then recombine the result's luminance with
the content's colour channels. We use YIQ, as the paper does.
"""

from __future__ import annotations

import torch

# Rows: Y, I, Q from R, G, B (NTSC 1953).
_RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ]
)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> YIQ."""
    matrix = _RGB_TO_YIQ.to(image.device, image.dtype)
    return torch.einsum("ij,bjhw->bihw", matrix, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) YIQ -> RGB."""
    matrix = torch.linalg.inv(_RGB_TO_YIQ.double()).to(image.device, image.dtype)
    return torch.einsum("ij,bjhw->bihw", matrix, image)


def luminance(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma Y."""
    return rgb_to_yiq(image)[:, :1]


def as_gray_rgb(luma: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma -> (B, 3, H, W) with R = G = B = Y, the input VGG sees."""
    return luma.expand(-1, 3, -1, -1).clamp(0, 1).contiguous()


def match_luminance(style_luma: torch.Tensor, content_luma: torch.Tensor) -> torch.Tensor:
    """Shift and scale style luma to the content's mean and std (Gatys et al. 2016, eq. 1)."""
    s_mean, s_std = style_luma.mean(), style_luma.std()
    c_mean, c_std = content_luma.mean(), content_luma.std()
    return (style_luma - s_mean) * (c_std / s_std.clamp_min(1e-6)) + c_mean


def combine_luminance(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Result's Y with the content's I and Q -> (B, 3, H, W) RGB in [0, 1]."""
    yiq = rgb_to_yiq(content)
    yiq = torch.cat([luminance(stylized), yiq[:, 1:]], dim=1)
    return yiq_to_rgb(yiq).clamp(0, 1)
