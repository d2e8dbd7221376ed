"""How many images of a size fit on the GPU at once: a pure estimate, then the device's free memory.

The estimate counts the activations the truncated VGG19 keeps for its backward pass (every
module's output up to the deepest layer the losses read), the gradient buffers of the widest
layer, float32 copies the losses make, and the per-image optimiser tensors. cuDNN workspaces
and allocator fragmentation are not modelled: SAFETY leaves room for them, and an
out-of-memory error halves the batch (see batch.stylize_many).
"""

from __future__ import annotations

from typing import Sequence

import torch

from stylequeue.engine.vgg import LAYER_INDEX, LAYER_NAMES

_BLOCK_CHANNELS = (64, 128, 256, 512, 512)
# Share of the free memory a batch may plan to use.
SAFETY = 0.6
# Per-image float32 tensors of the image's size: image, its gradient, Adam's two moments, EMA,
# the stacked copy, normalised/clamped temporaries, the preview snapshot.
_IMAGE_COPIES = 8


def _layer_shapes(height: int, width: int, last: int) -> list[tuple[str, int, int, int]]:
    """(name, channels, h, w) of each module's output, up to index ``last``."""
    shapes = []
    h, w = height, width
    for name in LAYER_NAMES[: last + 1]:
        block = int(name[4])  # conv3_2, relu3_2, pool3: the block is the fifth character
        channels = _BLOCK_CHANNELS[block - 1]
        if name.startswith("pool"):
            h, w = h // 2, w // 2  # kernel 2, stride 2, floor
        shapes.append((name, channels, h, w))
    return shapes


def activation_bytes(height: int, width: int, layers: Sequence[str], *, dtype_bytes: int = 4) -> int:
    """Bytes one image needs for one forward and backward of VGG19 cut at ``layers``' deepest.

    ``dtype_bytes`` is the forward's element size: 4 for float32, 2 under bf16/fp16 autocast.
    """
    last = max(LAYER_INDEX[name] for name in layers)
    shapes = _layer_shapes(height, width, last)
    sizes = [c * h * w for _, c, h, w in shapes]
    saved = sum(sizes) * dtype_bytes  # outputs autograd keeps for the backward pass
    gradients = 2 * max(sizes) * dtype_bytes  # incoming and outgoing gradient of the widest layer
    wanted = set(layers)
    losses = sum(2 * c * h * w * 4 for name, c, h, w in shapes if name in wanted)  # float32 copies
    image = _IMAGE_COPIES * 3 * height * width * 4
    return saved + gradients + losses + image


def max_batch(free_bytes: int, per_image_bytes: int, *, cap: int, safety: float = SAFETY) -> int:
    """Largest batch, 1 to ``cap``, whose estimate fits in ``safety`` of ``free_bytes``."""
    if per_image_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * safety) // per_image_bytes))


def fit_batch_size(
    height: int, width: int, layers: Sequence[str], device: torch.device, *, cap: int, dtype_bytes: int = 4
) -> int:
    """The batch size to run at (height, width) on ``device``: ``cap`` off CUDA, else what fits now."""
    if device.type != "cuda" or cap <= 1:
        return max(1, cap)
    free, _total = torch.cuda.mem_get_info(device)
    return max_batch(free, activation_bytes(height, width, layers, dtype_bytes=dtype_bytes), cap=cap)
