"""VGGFeatures: naming, the layer cut, freezing, pooling and normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from stylequeue.engine.network import VGG19
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.exceptions import ConfigError, WeightsError



@dataclass
class FakeLoaded:
    """Stands in for weights.LoadedWeights: anything with .state_dict and .info."""

    state_dict: dict
    info: Any


def test_names_cover_torchvision_modules_in_order() -> None:
    modules = list(torchvision.models.vgg19(weights=None).features)
    assert len(VGG19.names) == len(modules) == 37
    assert VGG19.names[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert (VGG19.layer("conv4_2").index, VGG19.layer("relu5_1").index, VGG19.layer("pool5").index) == (21, 29, 36)
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, module in zip(VGG19.names, modules):
        assert isinstance(module, kinds[name[:4]]), name


def test_forward_runs_only_up_to_the_deepest_requested_layer(model_max: VGGFeatures) -> None:
    calls: list[int] = []
    hooks = [
        m.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, m in enumerate(model_max.layers)
    ]
    try:
        out = model_max(torch.rand(1, 3, 32, 32), ["relu2_1", "conv1_2"])
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(VGG19.layer("relu2_1").index + 1))
    assert set(out) == {"relu2_1", "conv1_2"}
    assert out["relu2_1"].shape == (1, 128, 16, 16)


def test_conv_and_relu_outputs_both_survive(model_max: VGGFeatures) -> None:
    out = model_max(torch.rand(1, 3, 32, 32), ["conv1_1", "relu1_1"])
    assert (out["conv1_1"] < 0).any()
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp_min(0))


def test_weights_frozen_and_eval(model_max: VGGFeatures) -> None:
    assert not any(p.requires_grad for p in model_max.parameters())
    model_max.train()
    assert not model_max.training and not any(m.training for m in model_max.modules())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    model_max(x, ["relu3_1"])["relu3_1"].sum().backward()
    assert x.grad is not None and all(p.grad is None for p in model_max.parameters())


def test_imagenet_normalisation_inside(model_max: VGGFeatures, vgg_state_dict: dict) -> None:
    reference = torchvision.models.vgg19(weights=None).features.eval()
    reference.load_state_dict(vgg_state_dict)
    x = torch.rand(2, 3, 32, 40)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = reference[: VGG19.layer("relu3_1").index + 1]((x - mean) / std)
    torch.testing.assert_close(model_max(x, ["relu3_1"])["relu3_1"], expected)
    normalized_in = model_max((x - mean) / std, ["relu3_1"], normalized=True)["relu3_1"]
    torch.testing.assert_close(normalized_in, expected)


def test_average_pooling_replaces_max(model_avg: VGGFeatures) -> None:
    pools = [m for m in model_avg.layers if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert len(pools) == 5 and all(isinstance(p, nn.AvgPool2d) for p in pools)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(model_avg(x, ["pool1"])["pool1"], nn.functional.avg_pool2d(
        model_avg(x, ["relu1_2"])["relu1_2"], 2))


def test_unknown_layer_lists_valid_names(model_max: VGGFeatures) -> None:
    with pytest.raises(ConfigError, match="relu9_9.*conv1_1"):
        model_max(torch.rand(1, 3, 16, 16), ["relu9_9"])


def test_from_weights_accepts_full_and_features_state_dicts(vgg_state_dict: dict) -> None:
    full = {f"features.{k}": v for k, v in vgg_state_dict.items()}
    full["classifier.0.weight"] = torch.zeros(1)
    model = VGGFeatures.from_weights(FakeLoaded(full, "info"), pooling="avg", device="cpu")
    assert model.info == "info" and model.pooling == "avg"
    torch.testing.assert_close(model.layers[0].weight, vgg_state_dict["0.weight"])


def test_wrong_weights_raise_weights_error(vgg_state_dict: dict) -> None:
    bad = dict(vgg_state_dict)
    bad["0.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(WeightsError, match="VGG19"):
        VGGFeatures(bad)
    with pytest.raises(ConfigError, match="pooling"):
        VGGFeatures(vgg_state_dict, pooling="median")


def test_too_small_input_is_a_config_error_naming_the_layer(model_max: VGGFeatures) -> None:
    # relu5_1 sits after four pools: a side below 16 px would reach it as 0 px.
    with pytest.raises(ConfigError, match=r"24x15 px is too small for VGG19 layer relu5_1.*16 px"):
        model_max(torch.rand(1, 3, 15, 24), ["relu5_1"])
    # The same size is fine for a shallower cut.
    assert model_max(torch.rand(1, 3, 15, 24), ["relu3_1"])["relu3_1"].shape[-2:] == (3, 6)
