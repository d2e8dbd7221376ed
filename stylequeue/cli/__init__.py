"""The ``stylequeue`` command: one argparse parser, one module per subcommand.

Each module named in :data:`SUBCOMMANDS` has ``register(subparsers)``, which adds its parser and
sets ``handler`` (``args -> exit code``) as a default. Registering a new subcommand is one line
here. Modules import torch, celery and the engine inside their handlers only, so
``stylequeue --help`` stays fast.

Exit codes: 0 done, 1 an operating-system error (disk, permissions), 2 a usage or input error
(bad option, unreadable image, missing weights), 3 a job FAILED or was CANCELLED (``submit
--wait``, ``manifest``, ``demo``), 4 ``--wait`` timed out, 130 interrupted.

Every subcommand reads :class:`Settings` from the environment (``STYLEQUEUE_*``,
``STYLEQUEUE_CONFIG``), so a producer's shell and a worker's container agree by configuration.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, Sequence

from stylequeue import __version__
from stylequeue.exceptions import StyleQueueError

SUBCOMMANDS: tuple[str, ...] = (
    "stylequeue.cli.run",
    "stylequeue.cli.weights",
    "stylequeue.cli.worker",
    "stylequeue.cli.submit",
    "stylequeue.cli.demo",
    "stylequeue.cli.status",
    "stylequeue.cli.jobs",
    "stylequeue.cli.cancel",
    "stylequeue.cli.manifest",
    "stylequeue.cli.beat",
    "stylequeue.cli.recover",
    "stylequeue.cli.flower",
    "stylequeue.cli.metrics",
)
EXIT_JOB_FAILED = 3
EXIT_TIMEOUT = 4


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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def emit(args: argparse.Namespace, obj: Any, line: str) -> None:
    """``obj`` as JSON with --json, else the one line a shell script wants."""
    if args.json:
        print_json(obj)
    else:
        print(line)


def progress_line(p: dict[str, Any]) -> str:
    """A job's PROGRESS meta in one line: iteration, scale, loss and ETA."""
    loss = (p.get("losses") or {}).get("total")
    eta = p.get("eta_s")
    return (f"iteration {p.get('iteration')}/{p.get('total')}  scale {p.get('scale', 0) + 1}/"
            f"{p.get('num_scales', 1)}  loss {loss if loss is None else f'{loss:.4g}'}  "
            f"eta {'?' if eta is None else f'{eta:.0f}s'}")
