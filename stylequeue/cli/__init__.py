"""The ``stylequeue`` command: one argparse parser, one module per subcommand.

Each module named in :data:`SUBCOMMANDS` has ``register(subparsers)``, which adds its parser and
sets ``handler`` (``args -> exit code``) as a default. Registering a new subcommand is one line
here. Modules import torch, celery and the engine inside their handlers only, so
``stylequeue --help`` stays fast.

Exit codes: 0 done, 1 an operating-system error (disk, permissions), 2 a usage or input error
(bad option, unreadable image, missing weights), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from stylequeue import __version__
from stylequeue.exceptions import StyleQueueError

SUBCOMMANDS: tuple[str, ...] = (
    "stylequeue.cli.run",
    "stylequeue.cli.weights",
    "stylequeue.cli.flower",
    "stylequeue.cli.metrics",
    "stylequeue.cli.service",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylequeue",
        description="Neural style transfer (Gatys et al.), locally or as a GPU job service.",
    )
    parser.add_argument("--version", action="version", version=f"stylequeue {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level (default: warnings only)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (errors are one line on stderr, no traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="stylequeue: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args))
    except StyleQueueError as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def fail(message: str, code: int) -> int:
    """Print the one-line error every subcommand uses and return ``code``."""
    print(f"stylequeue: error: {message}", file=sys.stderr)
    return code
