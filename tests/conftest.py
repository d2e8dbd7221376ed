"""Shared test set-up: few threads (the machine is shared) and tiny deterministic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth-ish random RGB image: noise plus gradients, so it has structure at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0 * x], axis=-1)
    noise = rng.random((height, width, 3), dtype=np.float32)
    array = (0.5 * base + 0.5 * noise) * 255
    return Image.fromarray(array.round().astype(np.uint8), "RGB")


@pytest.fixture
def content_image() -> Image.Image:
    """48 x 32 (width x height): not square, so transposed shapes would show."""
    return make_image(48, 32, seed=1)


@pytest.fixture
def style_image() -> Image.Image:
    return make_image(40, 40, seed=2)


@pytest.fixture
def second_style_image() -> Image.Image:
    return make_image(32, 48, seed=3)
