"""``stylequeue weights export`` and ``stylequeue weights info``.

``export`` turns any weights source into a features-only file (~80 MB instead of torchvision's
548 MB) plus ``FILE.sha256``, for a fleet of workers to pull (``--weights s3://...`` with
``--weights-sha256``). ``info`` checks a file the way a worker would load it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stylequeue.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="export or inspect VGG19 weight files")
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
    export.add_argument("-o", "--output", required=True, metavar="FILE")
    export.set_defaults(handler=export_command)

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
        cache_dir=settings.resolved_weights_cache_dir,
    )  # fmt: skip
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) from {settings.weights}")
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
    print(f"layout:     {info['layout']} VGG19")
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
