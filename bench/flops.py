"""Analytic FLOP counts of one style-transfer iteration, from VGG19's conv shapes.

Formulas (a multiply-add counts as 2 FLOPs; ReLU, pooling, the losses' element-wise work and the
optimiser's update are left out: they are memory-bound and a few per cent of the FLOPs):

* conv forward:                 2 * Cin * Cout * k * k * H * W   (k = 3, padding 1: output H x W)
* conv backward, input grad:    the same again (a transposed convolution of the same size)
* conv backward, weight grad:   the same again; only the seed loop pays it (its VGG is not frozen)
* Gram matrix of (C, H*W):      2 * C * C * H * W forward, twice that backward
* pool (2x2, stride 2):         H, W -> floor(H / 2), floor(W / 2)

An engine iteration (frozen VGG, targets fixed) = forward of the net cut at the deepest needed
layer + input-gradient backward through it + the Gram products of the image's style layers.
(The first conv's input gradient is needed: the image is what is optimised.)
A seed-loop step = 3 forwards of all 16 convs + for each of the 3 passes an input-gradient and a
weight-gradient backward through conv1_1..conv5_1 (the content and style passes reach the loss
through the weights) + Gram products for the image and the style, forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from stylequeue.engine.vgg import LAYER_INDEX, LAYER_NAMES

# torchvision's VGG19 "E": channel counts, "M" for a 2x2 pool.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip
SEED_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@dataclass(frozen=True)
class Conv:
    name: str
    cin: int
    cout: int
    height: int
    width: int

    @property
    def forward_flops(self) -> int:
        return 2 * self.cin * self.cout * 9 * self.height * self.width


def convs(height: int, width: int, last_layer: str = "pool5") -> list[Conv]:
    """The convs a forward to ``last_layer`` runs on an (H, W) input, with their output sizes."""
    last = LAYER_INDEX[last_layer]
    out: list[Conv] = []
    cin, h, w, index = 3, height, width, 0
    for item in VGG19_CFG:
        if index > last:
            break
        if item == "M":
            h, w, index = h // 2, w // 2, index + 1
            continue
        out.append(Conv(LAYER_NAMES[index], cin, int(item), h, w))
        cin, index = int(item), index + 2  # conv, then its relu
    return out


def feature_shapes(height: int, width: int, layers: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) of each named layer's output (conv and relu share a shape; a pool halves)."""
    shapes = {}
    for name in layers:
        index = LAYER_INDEX[name]
        if name.startswith("pool"):
            conv = convs(height, width, LAYER_NAMES[index - 2])[-1]
            shapes[name] = (conv.cout, conv.height // 2, conv.width // 2)
        else:
            conv = convs(height, width, LAYER_NAMES[index - (index % 2 != 0)]) [-1]
            shapes[name] = (conv.cout, conv.height, conv.width)
    return shapes


def gram_flops(height: int, width: int, layers: Sequence[str]) -> int:
    """Forward FLOPs of the Gram matrices of ``layers``."""
    return sum(2 * c * c * h * w for c, h, w in feature_shapes(height, width, layers).values())


def engine_iteration_flops(height: int, width: int, content_layers: Sequence[str],
                           style_layers: Sequence[str]) -> int:
    """One engine iteration (one loss evaluation and its gradient) on an (H, W) image."""
    deepest = max(list(content_layers) + list(style_layers), key=LAYER_INDEX.__getitem__)
    forward = sum(c.forward_flops for c in convs(height, width, deepest))
    gram = gram_flops(height, width, style_layers)
    return 2 * forward + 3 * gram


def seed_step_flops(height: int, width: int) -> int:
    """One step of the seed's loop (bench/seed_loop.py) on an (H, W) image."""
    full = sum(c.forward_flops for c in convs(height, width, "pool5"))
    to_conv5_1 = sum(c.forward_flops for c in convs(height, width, "relu5_1"))
    gram = gram_flops(height, width, SEED_LAYERS)
    return 3 * full + 3 * 2 * to_conv5_1 + 2 * 3 * gram
