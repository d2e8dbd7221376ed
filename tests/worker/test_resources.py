"""Resources: what a process keeps between jobs is made once, kept bounded, and shared by equal settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from stylequeue.engine.weights import export_features
from stylequeue.settings import Settings
from stylequeue.worker import resources as resources_mod
from stylequeue.worker.resources import Resources, resources_for


def _settings(tmp_path: Path, **changes: object) -> Settings:
    values = {"data_dir": str(tmp_path), "weights": "random:0", "device": "cpu", "target_cache_storage": False}
    return Settings(**{**values, **changes})


def test_equal_settings_share_one_owner_and_others_do_not(tmp_path: Path) -> None:
    a = resources_for(_settings(tmp_path))
    assert resources_for(_settings(tmp_path)) is a  # by value, not by object identity
    assert resources_for(_settings(tmp_path, batch_max=2)) is not a


def test_models_and_weights_are_built_once_and_reused(tmp_path: Path) -> None:
    owner = Resources(_settings(tmp_path))
    avg = owner.model("avg")
    assert owner.model("avg") is avg and owner.model("avg", "random:0", "cpu") is avg
    maximum = owner.model("max")
    assert maximum is not avg and maximum.pooling == "max"
    # Both poolings were built from one load of the weights.
    assert owner.weights() is owner.weights("random:0")
    assert torch.equal(avg.layers[0].weight, maximum.layers[0].weight)
    assert avg.info.random and avg.info.seed == 0


def test_a_job_may_not_grow_the_cache_without_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources_mod, "MAX_MODELS", 2)
    owner = Resources(_settings(tmp_path))
    first = owner.model("avg", "random:1")
    owner.model("avg", "random:2")
    assert owner.model("avg", "random:1") is first  # used again: now the most recent
    owner.model("avg", "random:3")  # evicts random:2, not random:1
    assert owner.model("avg", "random:1") is first
    assert len(owner._models) == 2


def test_an_edited_weights_file_is_loaded_again(tmp_path: Path) -> None:
    path, _ = export_features("random:5", tmp_path / "w.pth")
    owner = Resources(_settings(tmp_path, weights=str(path)))
    before = owner.model("avg")
    time.sleep(0.01)
    export_features("random:6", path)  # a new file at the same path (another mtime)
    after = owner.model("avg")
    assert after is not before and after.info.seed == 6
    assert not torch.equal(after.layers[0].weight, before.layers[0].weight)


def test_target_cache_follows_the_settings(tmp_path: Path) -> None:
    assert Resources(_settings(tmp_path, target_cache_mb=0)).target_cache() is None
    owner = Resources(_settings(tmp_path))
    assert owner.target_cache() is owner.target_cache() is not None
