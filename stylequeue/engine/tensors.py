"""Images as the tensors the engine optimises, and back.

One convention everywhere: a (B, 3, H, W) float32 tensor of RGB in [0, 1]; the model normalises
it for VGG (see vgg.VGGFeatures.normalize).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from stylequeue.engine.device import ExecutionPlan


def to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous().to(device)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> PIL RGB (rounded, not truncated)."""
    array = image[0].detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def memory_format(x: torch.Tensor, plan: ExecutionPlan) -> torch.Tensor:
    """Channels-last where the plan asks (CUDA convolutions run faster on NHWC)."""
    return x.contiguous(memory_format=torch.channels_last) if plan.channels_last else x
