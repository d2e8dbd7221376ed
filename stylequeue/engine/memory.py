"""How many images of a size fit on a GPU at once, and the largest size that fits: pure estimates
(no torch: the scheduler sizes a job's tiles with them before anything is queued).

The estimate counts the activations the truncated VGG19 keeps for its backward pass (every
module's output up to the deepest layer the losses read), the gradient buffers of the widest
layer, float32 copies the losses make, and the per-image optimiser tensors. cuDNN workspaces
and allocator fragmentation are not modelled: SAFETY leaves room for them, and an
out-of-memory error halves the batch (see transfer.stylize_many) or splits a tile (tiled.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from stylequeue.engine.network import VGG19, Network, network

if TYPE_CHECKING:
    from stylequeue.engine.config import StyleConfig

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


def largest_side(
    layers: Sequence[str], memory_bytes: int, *, aspect: float = 1.0, dtype_bytes: int = 4,
    network: Network = VGG19, safety: float = SAFETY,
) -> int:
    """The longest output side (px) one image of ``aspect`` (short / long side) can be optimised at
    within ``safety`` of ``memory_bytes``: what decides whether a job runs untiled, and its tiles' size."""
    low, high = 16, 65536
    while low < high:  # activation_bytes grows with the side: bisect for the last that fits
        mid = (low + high + 1) // 2
        short = max(1, round(mid * aspect))
        if activation_bytes(short, mid, layers, dtype_bytes=dtype_bytes, network=network) <= memory_bytes * safety:
            low = mid
        else:
            high = mid - 1
    return low


def tiling(config: "StyleConfig", memory_bytes: int, *, dtype_bytes: int) -> dict[str, Any]:
    """The changes that make ``config`` fit a device of ``memory_bytes``: none when its final size
    fits; otherwise tiles at the final size and coarse scales that end at a size that fits.

    The tiles are squares (a square is the worst case for a given longest side), a multiple of
    32, that fit with their context on every side, overlapping by an eighth.
    """
    from stylequeue.engine.config import MIN_TILE

    fit = largest_side([*config.content_layers, *config.style_layers], memory_bytes,
                       dtype_bytes=dtype_bytes, network=network(config.network))
    if config.size <= fit:
        return {}
    tile = max(MIN_TILE, (fit - 2 * config.tile_context) // 32 * 32)
    changes: dict[str, Any] = {"tile_size": tile, "tile_overlap": max(16, tile // 8)}
    if config.scales < 2 or config.scale_sizes[-2] > fit:
        changes.update(scales=2, min_size=min(fit, config.size - 1))
    return changes
