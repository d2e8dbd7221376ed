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

from stylequeue.engine.network import VGG19, Network

# Share of the free memory a batch may plan to use.
SAFETY = 0.6
# Per-image float32 tensors of the image's size: image, its gradient, Adam's two moments, EMA,
# the stacked copy, normalised/clamped temporaries, the preview snapshot.
_IMAGE_COPIES = 8


def activation_bytes(
    height: int, width: int, layers: Sequence[str], *, dtype_bytes: int = 4, network: Network = VGG19
) -> int:
    """Bytes one image needs for one forward and backward of ``network`` cut at ``layers``' deepest.

    ``dtype_bytes`` is the forward's element size: 4 for float32, 2 under bf16/fp16 autocast.
    """
    shapes = network.shapes(height, width, network.deepest(layers).name)
    sizes = [c * h * w for _, c, h, w in shapes]
    saved = sum(sizes) * dtype_bytes  # outputs autograd keeps for the backward pass
    gradients = 2 * max(sizes) * dtype_bytes  # incoming and outgoing gradient of the widest layer
    wanted = set(layers)
    losses = sum(2 * c * h * w * 4 for layer, c, h, w in shapes if layer.name in wanted)  # float32 copies
    image = _IMAGE_COPIES * 3 * height * width * 4
    return saved + gradients + losses + image


def max_batch(free_bytes: int, per_image_bytes: int, *, cap: int, safety: float = SAFETY) -> int:
    """Largest batch, 1 to ``cap``, whose estimate fits in ``safety`` of ``free_bytes``."""
    if per_image_bytes <= 0:
        return cap
    return max(1, min(cap, int(free_bytes * safety) // per_image_bytes))


def fit_batch_size(
    height: int, width: int, layers: Sequence[str], device: torch.device, *, cap: int, dtype_bytes: int = 4,
    network: Network = VGG19,
) -> int:
    """The batch size to run at (height, width) on ``device``: ``cap`` off CUDA, else what fits now."""
    if device.type != "cuda" or cap <= 1:
        return max(1, cap)
    free, _total = torch.cuda.mem_get_info(device)
    per_image = activation_bytes(height, width, layers, dtype_bytes=dtype_bytes, network=network)
    return max_batch(free, per_image, cap=cap)
