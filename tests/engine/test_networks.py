"""The two networks and the two input conventions: names, shapes, and what each feeds the convs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from stylequeue.engine import StyleConfig, preset, stylize
from stylequeue.engine.network import CONVENTIONS, VGG16, VGG19, recognise
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.engine.weights import load_weights
from stylequeue.exceptions import ConfigError


@pytest.mark.parametrize("net,make", [(VGG16, torchvision.models.vgg16), (VGG19, torchvision.models.vgg19)])
def test_layers_and_shapes_are_torchvisions(net, make) -> None:
    modules = list(make(weights=None).features)
    assert len(net.names) == len(modules)
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for layer, module in zip(net.layers, modules):
        assert isinstance(module, kinds[layer.kind]), layer.name
        if layer.kind == "conv":
            assert (module.in_channels, module.out_channels) == (layer.in_channels, layer.channels)
    reference = {k: tuple(v.shape) for k, v in make(weights=None).features.state_dict().items()}
    assert net.parameter_shapes() == reference and recognise(reference) is net
    assert [(l.name, c, h, w) for l, c, h, w in net.shapes(224, 224, "pool5")][-1] == ("pool5", 512, 7, 7)


def test_vgg16_has_no_fourth_conv_per_block() -> None:
    assert "relu3_4" in VGG19.names and "relu3_4" not in VGG16.names
    assert (VGG16.layer("relu4_2").index, VGG16.layer("relu5_1").index) == (20, 25)
    with pytest.raises(ConfigError, match="unknown VGG16 style layer"):
        preset("default", network="vgg16", style_layers=("relu3_4",))
    assert preset("default", network="vgg16").network == "vgg16"  # the presets' layers exist in both


def test_caffe_convention_is_bgr_0_255_less_the_mean() -> None:
    model = VGGFeatures(load_weights("random:1:vgg16").state_dict, convention=CONVENTIONS["caffe"])
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    by_hand = rgb.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(rgb), by_hand)
    torch.testing.assert_close(model.denormalize(model.normalize(rgb)), rgb, rtol=0, atol=1e-5)
    plain = VGGFeatures(load_weights("random:1:vgg16").state_dict)
    assert plain.network is VGG16 and plain.convention.name == "torchvision"


def test_the_config_network_must_be_the_weights(content_image, style_image) -> None:
    model = VGGFeatures(load_weights("random:1:vgg16").state_dict, pooling=StyleConfig().pooling)
    fast = dict(size=32, iterations=1, content_layers=("relu2_1",), style_layers=("relu1_1",))
    with pytest.raises(ConfigError, match="settings are for vgg19 but the weights are vgg16's"):
        stylize(content_image, [style_image], preset("default", **fast), model=model)
    result = stylize(content_image, [style_image], preset("default", network="vgg16", **fast), model=model)
    assert result.metadata()["config"]["network"] == "vgg16"
