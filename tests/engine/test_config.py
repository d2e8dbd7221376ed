"""StyleConfig validation and its dict round trip (what job specs and the CLI use)."""

from __future__ import annotations

import json
import math

import pytest

from stylequeue.engine import StyleConfig, preset
from stylequeue.exceptions import ConfigError


def test_defaults_validate_and_round_trip_through_json() -> None:
    cfg = preset("seed", style_blend_weights=(1.0, 2.0))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert StyleConfig.from_dict(data) == cfg
    assert StyleConfig().validate() == StyleConfig()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"style_weight": math.nan}, "style_weight must be a finite number"),
        ({"content_weight": -1.0}, "content_weight must be a finite number >= 0"),
        ({"tv_weight": math.inf}, "tv_weight"),
        ({"style_layers": ("relu1_1", "conv9_9")}, r"unknown VGG19 style layer.*conv9_9.*valid names.*relu4_2"),
        ({"content_layers": ()}, "at least one"),
        ({"iterations": 0}, "iterations must be a whole number from 1 to 100000"),
        ({"iterations": 10**9}, "iterations"),
        ({"size": 4}, "size"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"style_layer_weights": (1.0, 2.0)}, "one weight per layer"),
        ({"style_layer_weights": (1.0, 1.0, 1.0, math.nan, 1.0)}, "style layer weight"),
        ({"style_blend_weights": (0.0, 0.0)}, "must not all be zero"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"scales": 3, "min_size": 600}, "min_size"),
        ({"betas": (0.9,)}, "betas"),
        ({"precision": "fp8"}, "precision"),
    ],
)
def test_invalid_settings_say_what_is_wrong(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StyleConfig().replace(**changes)


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown style setting\(s\) \['colour', 'itrations'\]"):
        StyleConfig.from_dict({"itrations": 3, "colour": True})
