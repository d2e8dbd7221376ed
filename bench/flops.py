"""Analytic FLOP counts of one style-transfer iteration, from the network's conv shapes
(:class:`stylequeue.engine.network.Network`).

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

from typing import Sequence

from stylequeue.engine.network import VGG19, Network

SEED_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def forward_flops(height: int, width: int, last_layer: str = "pool5", network: Network = VGG19) -> int:
    """FLOPs of the convs a forward to ``last_layer`` runs on an (H, W) input."""
    return sum(f for _, f in network.conv_forward_flops(height, width, last_layer))


def feature_shapes(
    height: int, width: int, layers: Sequence[str], network: Network = VGG19
) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) of each named layer's output."""
    deepest = network.deepest(layers).name
    return {layer.name: (c, h, w) for layer, c, h, w in network.shapes(height, width, deepest)
            if layer.name in set(layers)}


def gram_flops(height: int, width: int, layers: Sequence[str], network: Network = VGG19) -> int:
    """Forward FLOPs of the Gram matrices of ``layers``."""
    return sum(2 * c * c * h * w for c, h, w in feature_shapes(height, width, layers, network).values())


def engine_iteration_flops(height: int, width: int, content_layers: Sequence[str],
                           style_layers: Sequence[str], network: Network = VGG19) -> int:
    """One engine iteration (one loss evaluation and its gradient) on an (H, W) image."""
    deepest = network.deepest([*content_layers, *style_layers]).name
    forward = forward_flops(height, width, deepest, network)
    gram = gram_flops(height, width, style_layers, network)
    return 2 * forward + 3 * gram


def seed_step_flops(height: int, width: int) -> int:
    """One step of the seed's loop (bench/seed_loop.py, VGG19) on an (H, W) image."""
    full = forward_flops(height, width, "pool5")
    to_conv5_1 = forward_flops(height, width, "relu5_1")
    gram = gram_flops(height, width, SEED_LAYERS)
    return 3 * full + 3 * 2 * to_conv5_1 + 2 * 3 * gram
