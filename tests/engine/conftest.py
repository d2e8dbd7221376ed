"""Engine fixtures: random VGG19 weights (no downloads) and models built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchvision

from stylequeue.engine.config import StyleConfig
from stylequeue.engine.vgg import VGGFeatures


def random_features_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's VGG19 ``features`` state dict with its own random initialisation."""
    torch.manual_seed(seed)
    return torchvision.models.vgg19(weights=None).features.state_dict()


@dataclass
class _Loaded:
    """Stands in for weights.LoadedWeights: anything with .state_dict and .info."""

    state_dict: dict[str, torch.Tensor]
    info: Any


@pytest.fixture(scope="session")
def vgg_state_dict() -> dict[str, torch.Tensor]:
    return random_features_state_dict(0)


@pytest.fixture(scope="session")
def model_max(vgg_state_dict: dict[str, torch.Tensor]) -> VGGFeatures:
    info = {"source": "random:0", "sha256": None, "random": True, "seed": 0}
    return VGGFeatures.from_weights(_Loaded(vgg_state_dict, info), pooling="max")


@pytest.fixture(scope="session")
def model(model_max: VGGFeatures, model_avg: VGGFeatures) -> VGGFeatures:
    """The model the ``default`` preset runs on: its pooling, whatever that is."""
    return {"max": model_max, "avg": model_avg}[StyleConfig().pooling]


@pytest.fixture(scope="session")
def model_avg(vgg_state_dict: dict[str, torch.Tensor]) -> VGGFeatures:
    info = {"source": "random:0", "sha256": None, "random": True, "seed": 0}
    return VGGFeatures.from_weights(_Loaded(vgg_state_dict, info), pooling="avg")
