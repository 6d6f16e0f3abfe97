"""Command-line entry point: `vip2clip COMMAND ...`.

Each command group lives in its own module with a `register(subparsers)` function that adds its
sub-commands and binds them to a `run(args) -> int` function. `main` parses, joins torchrun's process group when
started by torchrun (`args.world`; see `vip2clip.utils.distributed`), dispatches and leaves the group.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from vip2clip import __version__

# Modules under vip2clip.cli that each add one or more sub-commands.
COMMAND_MODULES: tuple[str, ...] = ("model", "data", "train", "evaluate", "study", "predict", "apps")
# The commands that run under `torchrun --nproc-per-node N -m vip2clip ...` (the others run in one process).
DISTRIBUTED_COMMANDS = frozenset({"train", "test", "benchmark", "study", "predict", "calibrate"})


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


def _rank_exit_code(args: argparse.Namespace, code: int) -> int:
    """A finished command's exit code on this rank. Under torchrun only rank 0 carries a non-zero code (after every
    rank has finished: `close` waits at a barrier), with one sentence for torchrun's summary: a rank that exits
    non-zero is a failed rank to torchrun, which stops the others with SIGTERM."""
    from vip2clip.utils.distributed import record_error

    if not code or not args.world.distributed:
        return code
    if not args.world.is_main:
        return 0
    record_error(
        f"vip2clip {args.command} finished with exit code {code} (not a crash: the results are written; "
        "exit code 1 means some inputs could not be judged, see the output above)"
    )
    return code


def _join_world(args: argparse.Namespace):
    """The `World` of this process: torchrun's process group for the commands that support it, else one process.
    On ranks other than 0 only errors are logged (rank 0 reports for all)."""
    from vip2clip.utils.distributed import LOCAL, init_from_env, torchrun_env

    if torchrun_env() is None:
        return LOCAL
    if args.command not in DISTRIBUTED_COMMANDS:
        raise CLIError(
            f"runs in one process; start it without torchrun ({', '.join(sorted(DISTRIBUTED_COMMANDS))} "
            "run under torchrun)"
        )
    world = init_from_env(args.device)
    args.device = world.device
    if not world.is_main:
        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    return world


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from vip2clip.utils.distributed import LOCAL, RankFailedError, close, record_error

    args.world, failed, where, code = LOCAL, True, "", 0
    try:
        args.world = _join_world(args)
        if args.world.distributed:
            where = f" (rank {args.world.rank} of {args.world.size})"
        failed, code = False, _rank_exit_code(args, int(args.func(args) or 0))  # a non-zero code is a result here
        return code
    except (CLIError, OSError, ValueError) as error:  # user-facing: bad paths, full disks, bad files or options
        message = f"vip2clip {args.command}{where}: error: {_message(error)}"
        print(message, file=sys.stderr)
        record_error(message)
        return 2
    except RankFailedError as error:  # the failing rank has printed its error
        print(f"vip2clip {args.command}{where}: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vip2clip {args.command}{where}: interrupted", file=sys.stderr)
        return 130
    except BaseException as error:  # a bug, out of memory ...: the traceback follows; torchrun's summary names it
        record_error(f"vip2clip {args.command}{where}: {type(error).__name__}: {error}")
        raise
    finally:
        close(args.world, failed=failed, outlive_peers=code != 0)  # rank 0 exits 1 after the others: not a failed rank
