"""Command-line entry point: `vip2clip COMMAND ...`.

Each command group lives in its own module with a `register(subparsers)` function that adds its
sub-commands and binds them to a `run(args) -> int` function. `main` only parses and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from vip2clip import __version__

# Modules under vip2clip.cli that each add one or more sub-commands.
COMMAND_MODULES: tuple[str, ...] = ("model", "data", "train", "evaluate", "predict", "apps")


class CLIError(Exception):
    """An error for the user (bad path, bad option): printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vip2clip", description="ViP²-CLIP zero-shot anomaly detection")
    parser.add_argument("--version", action="version", version=f"vip2clip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"vip2clip.cli.{name}").register(subparsers)
    return parser


def _message(error: Exception) -> str:
    """The error in words: an OSError from the system as "PATH: reason" (not "[Errno 20] Not a directory: 'x'")."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, OSError, ValueError) as error:  # user-facing: bad paths, full disks, bad files or options
        print(f"vip2clip {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vip2clip {args.command}: interrupted", file=sys.stderr)
        return 130
