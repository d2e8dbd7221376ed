"""VGG19's layer names and size rules, without torch.

Kept apart from :mod:`stylequeue.engine.vgg` so that validating a job spec (producers, the
scheduler) does not import torch.
"""

from __future__ import annotations

from typing import Sequence

from stylequeue.exceptions import ConfigError

POOLINGS = ("max", "avg")


def _layer_names() -> tuple[str, ...]:
    """conv1_1, relu1_1, ..., pool5: the 37 modules of torchvision's vgg19().features, in order."""
    convs_per_block = (2, 2, 4, 4, 4)
    names: list[str] = []
    for block, n_convs in enumerate(convs_per_block, start=1):
        for i in range(1, n_convs + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return tuple(names)


LAYER_NAMES: tuple[str, ...] = _layer_names()
LAYER_INDEX: dict[str, int] = {name: i for i, name in enumerate(LAYER_NAMES)}


def check_layers(layers: Sequence[str], what: str = "layer") -> None:
    """Raise ConfigError naming every unknown layer and listing the valid names."""
    unknown = [name for name in layers if name not in LAYER_INDEX]
    if unknown:
        raise ConfigError(
            f"unknown VGG19 {what}(s) {unknown}; valid names are: {', '.join(LAYER_NAMES)}"
        )


def min_side_for(layer: str) -> int:
    """Smallest image side that still leaves one pixel at ``layer``: each pool halves (floor)."""
    pools = sum(1 for name in LAYER_NAMES[: LAYER_INDEX[layer] + 1] if name.startswith("pool"))
    return 2**pools


def check_input_size(size: tuple[int, int], deepest: str) -> None:
    """ConfigError, not a raw pooling error, when an image is too small for the deepest layer."""
    need = min_side_for(deepest)
    if min(size) < need:
        raise ConfigError(
            f"an image of {size[1]}x{size[0]} px is too small for VGG19 layer {deepest}: both "
            f"sides must be at least {need} px there; use a larger --size/--min-size or "
            "--style-scale, shallower layers, or an input with a less extreme aspect ratio"
        )
