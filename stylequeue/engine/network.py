"""The VGG networks, described once: every layer name, channel count, stride, shape and FLOP count
that any part of stylequeue uses is derived from :class:`Network`.

``vgg.py`` builds its modules from it, ``weights.py`` checks weights files against its parameter
shapes, ``config.py`` validates layer names with it, ``memory.py`` and ``bench/flops.py`` count
activations and FLOPs with it. It imports no torch, so validating a job spec (producers, the
scheduler) stays light.

The layout is torchvision's ``vgg*().features``: per block, ``conv``/``relu`` pairs and then a
2x2 stride-2 ``pool``; module ``i`` owns the state-dict keys ``"{i}.weight"`` and ``"{i}.bias"``.
Simonyan & Zisserman (2014), configurations D (VGG16) and E (VGG19).

A :class:`Convention` says what input a set of weights was trained on: torchvision's (RGB in
[0, 1], ImageNet mean and std) or Caffe's (BGR, 0 to 255, mean subtracted), which the VGG files
converted from the original release use (jcjohnson/neural-style, Keras's ImageNet VGGs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Mapping

from stylequeue.exceptions import ConfigError

POOLINGS = ("max", "avg")
KERNEL = 3  # every VGG conv is 3x3, stride 1, padding 1: it keeps the spatial size


@dataclass(frozen=True)
class Layer:
    """One module of ``features``: what it is called, where it sits and what it outputs."""

    name: str  # conv3_2, relu3_2, pool3
    kind: str  # "conv", "relu" or "pool"
    index: int  # position in ``features``: the number in its state-dict keys
    block: int  # 1 to 5
    in_channels: int
    channels: int  # output channels
    pools_before: int  # pools up to and including this module: each halves the sides (floor)


@dataclass(frozen=True)
class Network:
    """A VGG feature extractor's layout: ``convs_per_block`` convolutions in each of five blocks."""

    name: str
    convs_per_block: tuple[int, ...]
    block_channels: tuple[int, ...] = (64, 128, 256, 512, 512)
    in_channels: int = 3

    @cached_property
    def layers(self) -> tuple[Layer, ...]:
        """conv1_1, relu1_1, conv1_2, relu1_2, pool1, ..., pool5, in ``features`` order."""
        layers: list[Layer] = []
        channels, pools = self.in_channels, 0
        for block, (n_convs, out) in enumerate(zip(self.convs_per_block, self.block_channels), start=1):
            for i in range(1, n_convs + 1):
                layers.append(Layer(f"conv{block}_{i}", "conv", len(layers), block, channels, out, pools))
                layers.append(Layer(f"relu{block}_{i}", "relu", len(layers), block, out, out, pools))
                channels = out
            pools += 1
            layers.append(Layer(f"pool{block}", "pool", len(layers), block, out, out, pools))
        return tuple(layers)

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @cached_property
    def _by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}

    def layer(self, name: str) -> Layer:
        """The layer called ``name``; ConfigError listing the valid names if there is none."""
        self.check_layers([name])
        return self._by_name[name]

    def check_layers(self, names: Iterable[str], what: str = "layer") -> None:
        """Raise ConfigError naming every unknown layer and listing the valid names."""
        unknown = [name for name in names if name not in self._by_name]
        if unknown:
            raise ConfigError(
                f"unknown {self.name.upper()} {what}(s) {unknown}; valid names are: {', '.join(self.names)}"
            )

    def deepest(self, names: Iterable[str]) -> Layer:
        """The layer of ``names`` furthest into the network: a forward pass stops there."""
        return max((self.layer(name) for name in names), key=lambda layer: layer.index)

    def min_side_for(self, name: str) -> int:
        """Smallest image side that still leaves one pixel at layer ``name``."""
        return 2 ** self.layer(name).pools_before

    def check_input_size(self, size: tuple[int, int], deepest: str) -> None:
        """ConfigError, not a raw pooling error, when an (H, W) image is too small for ``deepest``."""
        need = self.min_side_for(deepest)
        if min(size) < need:
            raise ConfigError(
                f"an image of {size[1]}x{size[0]} px is too small for {self.name.upper()} layer "
                f"{deepest}: both sides must be at least {need} px there; use a larger "
                "--size/--min-size or --style-scale, shallower layers, or an input with a less "
                "extreme aspect ratio"
            )

    def shapes(self, height: int, width: int, upto: str) -> list[tuple[Layer, int, int, int]]:
        """(layer, channels, h, w) of each module's output for an (H, W) input, up to ``upto``."""
        last = self.layer(upto).index
        out = []
        for layer in self.layers[: last + 1]:
            scale = 2**layer.pools_before
            out.append((layer, layer.channels, height // scale, width // scale))
        return out

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"0.weight": (64, 3, 3, 3), "0.bias": (64,), ...}``: what a features state dict holds."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            if layer.kind == "conv":
                shapes[f"{layer.index}.weight"] = (layer.channels, layer.in_channels, KERNEL, KERNEL)
                shapes[f"{layer.index}.bias"] = (layer.channels,)
        return shapes

    def conv_forward_flops(self, height: int, width: int, upto: str) -> list[tuple[Layer, int]]:
        """(conv, forward FLOPs) of each conv a forward to ``upto`` runs; a multiply-add is 2 FLOPs."""
        return [
            (layer, 2 * layer.in_channels * c * KERNEL * KERNEL * h * w)
            for layer, c, h, w in self.shapes(height, width, upto)
            if layer.kind == "conv"
        ]


@dataclass(frozen=True)
class Convention:
    """What the first conv expects: ``(pixels[order] * scale - mean) / std`` per channel, from RGB
    pixels in [0, 1]. ``mean`` and ``std`` are in the network's own channel order."""

    name: str
    order: tuple[int, int, int]  # the RGB channels the network's channels 0, 1, 2 read
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CONVENTIONS: Mapping[str, Convention] = {
    # torchvision's ImageNet training statistics (RGB).
    "torchvision": Convention("torchvision", (0, 1, 2), 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # The Caffe VGG release: BGR, 0..255, the ImageNet mean (B, G, R) subtracted, no division.
    "caffe": Convention("caffe", (2, 1, 0), 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
}


def convention(name: str) -> Convention:
    """The convention called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ConfigError(f"unknown input convention {name!r}; choose one of: {', '.join(CONVENTIONS)}") from None


NETWORKS: Mapping[str, Network] = {
    "vgg16": Network("vgg16", (2, 2, 3, 3, 3)),
    "vgg19": Network("vgg19", (2, 2, 4, 4, 4)),
}
VGG16 = NETWORKS["vgg16"]
VGG19 = NETWORKS["vgg19"]


def network(name: str) -> Network:
    """The network called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise ConfigError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)}") from None


def features_only(state_dict: Mapping[str, object]) -> dict[str, object]:
    """A full torchvision state dict (``features.N.*`` and ``classifier.*``, perhaps under a
    ``module.`` prefix from DataParallel) or a features-only one (``N.*``) -> ``{"N.weight": ...}``."""
    keys = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("features.") for k in keys):
        return {k.removeprefix("features."): v for k, v in keys.items() if k.startswith("features.")}
    return keys



def recognise(shapes: Mapping[str, tuple[int, ...]]) -> Network | None:
    """The network whose features parameter shapes are exactly ``shapes``, or None."""
    for net in NETWORKS.values():
        if net.parameter_shapes() == dict(shapes):
            return net
    return None
