"""Weights sources: files the tests write, random weights, fetchers, imagenet offline."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from stylequeue.engine import weights as weights_mod
from stylequeue.engine.weights import (
    CONVENTION_MARKER,
    FEATURE_SHAPES,
    NETWORK_MARKER,
    describe_file,
    export_features,
    file_sha256,
    imagenet_cache_path,
    load_weights,
    register_fetcher,
)
from stylequeue.exceptions import (
    ConfigError,
    TransientStorageError,
    WeightsChecksumError,
    WeightsError,
    WeightsUnavailableError,
)


@pytest.fixture(scope="module")
def features() -> dict[str, torch.Tensor]:
    """A real-shaped VGG19 features state dict (random values, independent of the loader)."""
    torch.manual_seed(7)
    return make_layers(cfgs["E"]).state_dict()


@pytest.fixture(scope="module")
def features_file(tmp_path_factory: pytest.TempPathFactory, features: dict) -> Path:
    path = tmp_path_factory.mktemp("w") / "vgg19-features.pth"
    torch.save(features, path)
    return path


@pytest.fixture(scope="module")
def full_file(tmp_path_factory: pytest.TempPathFactory, features: dict) -> Path:
    """The key layout of torchvision's full vgg19().state_dict(). The classifier tensors are
    tiny stand-ins (the real ones are 470 MB and the loader never reads them)."""
    full = {f"features.{k}": v for k, v in features.items()}
    for index in (0, 3, 6):
        full[f"classifier.{index}.weight"] = torch.zeros(4, 4)
        full[f"classifier.{index}.bias"] = torch.zeros(4)
    path = tmp_path_factory.mktemp("w") / "vgg19-full.pth"
    torch.save(full, path)
    return path


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_expected_shapes_match_torchvision(features: dict) -> None:
    assert {k: tuple(v.shape) for k, v in features.items()} == FEATURE_SHAPES
    assert list(FEATURE_SHAPES)[-1] == "34.bias" and len(FEATURE_SHAPES) == 32


# --- random -------------------------------------------------------------------------------


def test_random_is_seeded_flagged_and_warns_every_time(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stylequeue.engine.weights"):
        a = load_weights("random:5")
        b = load_weights("random:5")  # every load is warned about
    assert sum("RANDOM VGG19 WEIGHTS" in r.message for r in caplog.records) == 2
    assert _same(a.state_dict, b.state_dict)
    other = load_weights("random:6").state_dict["0.weight"]
    assert not torch.equal(other, a.state_dict["0.weight"])
    assert a.info.to_dict() == {"source": "random:5", "sha256": None, "random": True, "seed": 5,
                                "network": "vgg19", "convention": "torchvision"}
    assert {k: tuple(v.shape) for k, v in a.state_dict.items()} == FEATURE_SHAPES
    assert float(a.state_dict["0.weight"].std()) > 0.05  # Kaiming scale, not zeros
    assert load_weights("random").info.seed == 0


@pytest.mark.parametrize("source", ["random:x", "random:1.5"])
def test_random_bad_seed(source: str) -> None:
    with pytest.raises(ConfigError, match="integer seed"):
        load_weights(source)


@pytest.mark.parametrize("source", ["imagenett", "vgg19", "", "ftp"])
def test_unknown_source_lists_the_accepted_forms(source: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_weights(source)
    message = str(info.value)
    assert all(form in message for form in ("imagenet", "s3://", "random", "path"))


# --- files --------------------------------------------------------------------------------


def test_features_only_file(features_file: Path, features: dict) -> None:
    loaded = load_weights(str(features_file))
    assert _same(loaded.state_dict, features)
    assert loaded.info.random is False and loaded.info.seed is None
    assert loaded.info.sha256 == hashlib.sha256(features_file.read_bytes()).hexdigest()
    assert loaded.info.source == str(features_file)


def test_full_state_dict_file(full_file: Path, features: dict) -> None:
    loaded = load_weights(full_file)
    assert _same(loaded.state_dict, features)  # classifier dropped, "features." stripped


@pytest.mark.parametrize("prefix", ["features.", "module.features.", "module."])
def test_other_key_prefixes(tmp_path: Path, features: dict, prefix: str) -> None:
    path = tmp_path / "w.pth"
    torch.save({prefix + k: v for k, v in features.items()}, path)
    assert _same(load_weights(path).state_dict, features)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "vgg19.pth"
    with pytest.raises(WeightsError, match=f"{path}.*does not exist"):
        load_weights(str(path))


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightsError, match=f"{path}.*cannot be read"):
        load_weights(path)


def test_truncated_file(tmp_path: Path, features_file: Path) -> None:
    path = tmp_path / "half.pth"
    data = features_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=f"{path}.*(truncated or corrupt)"):
        load_weights(path)


def test_wrong_shapes(tmp_path: Path, features: dict) -> None:
    bad = dict(features)
    bad["2.weight"] = bad["2.weight"].transpose(0, 1).contiguous()[:, :32]
    path = tmp_path / "shapes.pth"
    torch.save(bad, path)
    expected = r"shapes\.pth.*wrong shapes: 2\.weight is \(64, 32, 3, 3\)"
    with pytest.raises(WeightsError, match=expected):
        load_weights(path)


def test_missing_and_unexpected_keys(tmp_path: Path, features: dict) -> None:
    partial = {k: v for k, v in features.items() if not k.startswith("34.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    expected = r"partial\.pth.*missing 2 tensors \(34\.weight, 34\.bias\)"
    with pytest.raises(WeightsError, match=expected):
        load_weights(path)
    bn = {**features, "1.running_mean": torch.zeros(64)}
    torch.save(bn, path)
    with pytest.raises(WeightsError, match="unexpected tensors 1.running_mean"):
        load_weights(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(WeightsError, match="holds a Tensor"):
        load_weights(path)


def test_sha256_checked(features_file: Path) -> None:
    actual = file_sha256(features_file)
    assert load_weights(features_file, sha256=actual.upper()).info.sha256 == actual
    wrong = "0" * 64
    with pytest.raises(WeightsChecksumError) as info:
        load_weights(features_file, sha256=wrong)
    assert all(part in str(info.value) for part in (actual, wrong, str(features_file)))


# --- imagenet -----------------------------------------------------------------------------


def test_imagenet_offline_fails_fast_and_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # A proxy on a closed local port: a real connection failure, whatever network the host has.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_weights("imagenet")
    assert time.monotonic() - started < 30
    message = str(info.value)
    cache = imagenet_cache_path()
    assert cache.parent == tmp_path / "torch" / "hub" / "checkpoints"
    assert str(cache.parent) in message and cache.name in message
    assert "s3://" in message and "weights export" in message and "--weights" in message
    assert not cache.exists() and not list(cache.parent.glob("*.part"))


def test_imagenet_from_a_prepopulated_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_file: Path, features: dict
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = imagenet_cache_path()
    cache.parent.mkdir(parents=True)
    shutil.copyfile(full_file, cache)
    loaded = load_weights("imagenet")
    assert _same(loaded.state_dict, features)
    assert loaded.info.source == "imagenet" and loaded.info.sha256 == file_sha256(full_file)


# --- fetcher registry ---------------------------------------------------------------------


@pytest.fixture
def fake_store(monkeypatch: pytest.MonkeyPatch, features_file: Path) -> list[str]:
    """Registers a ``fake://`` fetcher that copies files_file and records each call."""
    monkeypatch.setattr(weights_mod, "_FETCHERS", {})
    calls: list[str] = []

    def fetch(uri: str, dest: Path) -> None:
        calls.append(uri)
        if uri.endswith("missing.pth"):
            raise RuntimeError("404 no such key")
        if uri.endswith("flaky.pth"):
            raise TransientStorageError("connection reset")
        shutil.copyfile(features_file, dest)

    register_fetcher("fake", fetch)
    return calls


def test_fetcher_is_called_once_and_cached_on_disk(
    fake_store: list[str], tmp_path: Path, features: dict, features_file: Path
) -> None:
    uri = "fake://bucket/models/vgg19.pth"
    first = load_weights(uri, cache_dir=str(tmp_path))
    second = load_weights(uri, cache_dir=str(tmp_path))
    assert fake_store == [uri]
    assert _same(first.state_dict, features) and _same(second.state_dict, features)
    assert first.info.source == uri and first.info.sha256 == file_sha256(features_file)
    assert [p.name.endswith("vgg19.pth") for p in tmp_path.iterdir()] == [True]


def test_fetcher_checksum_mismatch_is_not_cached(fake_store: list[str], tmp_path: Path) -> None:
    with pytest.raises(WeightsChecksumError):
        load_weights("fake://bucket/vgg19.pth", sha256="ab" * 32, cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_damaged_cache_entry_is_fetched_again(
    fake_store: list[str], tmp_path: Path, features: dict
) -> None:
    uri = "fake://bucket/vgg19.pth"
    load_weights(uri, cache_dir=str(tmp_path))
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"garbage")
    assert _same(load_weights(uri, cache_dir=str(tmp_path)).state_dict, features)
    assert fake_store == [uri, uri]


def test_fetcher_without_cache_dir_and_failures(fake_store: list[str], features: dict) -> None:
    assert _same(load_weights("fake://b/vgg19.pth").state_dict, features)
    with pytest.raises(WeightsUnavailableError, match="fake://b/missing.pth.*404"):
        load_weights("fake://b/missing.pth")
    with pytest.raises(TransientStorageError):  # storage errors keep their class (retryable)
        load_weights("fake://b/flaky.pth")


def test_unregistered_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_mod, "_FETCHERS", {})
    with pytest.raises(WeightsUnavailableError, match="s3://bucket/vgg.pth.*storage"):
        load_weights("s3://bucket/vgg.pth")


# --- export -------------------------------------------------------------------------------


def test_export_from_full_file(tmp_path: Path, full_file: Path, features: dict) -> None:
    dest = tmp_path / "out" / "vgg19-features.pth"
    path, digest = export_features(str(full_file), dest)
    assert path == dest and digest == file_sha256(dest)
    sidecar = tmp_path / "out" / "vgg19-features.pth.sha256"
    assert sidecar.read_text() == f"{digest}  {dest.name}\n"
    assert 79e6 < dest.stat().st_size < 81e6  # features only: ~80 MB, not 548 MB
    written = torch.load(dest, weights_only=True)
    assert set(written) == set(FEATURE_SHAPES) | {NETWORK_MARKER, CONVENTION_MARKER}
    assert describe_file(dest)["network"] == "vgg19" and describe_file(dest)["convention"] == "torchvision"
    assert _same(load_weights(dest, sha256=digest).state_dict, features)
    info = describe_file(dest)
    assert info["sha256"] == digest and info["layout"] == "features-only"
    assert info["sidecar_sha256_matches"] is True and info["tensors"] == 32
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".")] == []


def test_describe_reports_full_layout_and_bad_sidecar(tmp_path: Path, full_file: Path) -> None:
    assert describe_file(full_file)["layout"] == "full"
    copy = tmp_path / "w.pth"
    shutil.copyfile(full_file, copy)
    (tmp_path / "w.pth.sha256").write_text("f" * 64 + "  w.pth\n")
    assert describe_file(copy)["sidecar_sha256_matches"] is False
    with pytest.raises(WeightsError, match="does not exist"):
        describe_file(tmp_path / "nope.pth")


def test_export_of_random_weights_stays_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _ = export_features("random:9", tmp_path / "r.pth")
    with caplog.at_level(logging.WARNING, logger="stylequeue.engine.weights"):
        loaded = load_weights(path)
    assert loaded.info.random is True and loaded.info.seed == 9 and loaded.info.sha256
    assert any("RANDOM" in r.message for r in caplog.records)
    assert _same(loaded.state_dict, load_weights("random:9").state_dict)
    assert describe_file(path)["random"] is True


def test_random_networks_and_bounded_seeds() -> None:
    vgg16 = load_weights("random:3:vgg16")
    assert (vgg16.info.network, vgg16.info.source, len(vgg16.state_dict)) == ("vgg16", "random:3:vgg16", 26)
    assert load_weights("random:3:vgg19").info.source == "random:3"  # vgg19 is the default name
    with pytest.raises(ConfigError, match=r"at most 9223372036854775807"):
        load_weights("random:" + "9" * 25)  # a 25-digit seed: a clear error, not torch's ValueError
    for bad in ("random:3:resnet", "random:-1", "random::vgg16x"):
        with pytest.raises(ConfigError, match="random weights are named"):
            load_weights(bad)


def test_a_vgg16_file_is_recognised_by_its_shapes(tmp_path: Path) -> None:
    torch.save(load_weights("random:2:vgg16").state_dict, tmp_path / "plain16.pth")
    loaded = load_weights(tmp_path / "plain16.pth")
    assert (loaded.info.network, loaded.info.convention) == ("vgg16", "torchvision")
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "stub.pth")
    with pytest.raises(WeightsError, match="not a VGG16 or VGG19 state dict.*missing"):
        load_weights(tmp_path / "stub.pth")
