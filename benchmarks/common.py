"""Shared helpers of the benchmark scripts: RESULTS.md, the common options; the machine description, interleaved
timing and peak memory live in the package (`vip2clip.utils.measure`, also used by `vip2clip study efficiency`)
and are re-exported here.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from vip2clip.utils.measure import (  # noqa: F401 (re-exported for the benchmark scripts)
    Timing,
    current_rss_mib,
    describe_machine,
    machine_description,
    paired_ratio,
    peak_rss_mib,
    reset_peak_rss,
    synchronizer,
    time_interleaved,
)

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats are written as given by the caller (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, body: str, info: dict[str, str], path: Path = RESULTS_PATH) -> None:
    """Append one section (title, machine line, body) to RESULTS.md, atomically and under a lock.

    RESULTS.md is shared and append-only: existing text is copied unchanged, the new section goes last.
    The lock (on the folder) keeps two benchmark scripts finishing at once from losing a section.
    """
    section = f"\n## {title}\n\nMachine: {describe_machine(info)}\n\n{body.rstrip()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(old + section)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    finally:
        fcntl.flock(folder, fcntl.LOCK_UN)
        os.close(folder)


def publish(title: str, body: str, info: dict[str, str], record: bool, output: str | Path | None = None) -> None:
    """Print a result section; append it to RESULTS.md with `record` (--record) and to `output` (--output)."""
    print(body)
    targets = ([RESULTS_PATH] if record else []) + ([Path(output)] if output else [])
    for path in targets:
        append_results(title, body, info, path)


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3, timing: bool = True) -> None:
    """--threads --device --record, and with `timing` --repeats --warmup: the options benchmark scripts share."""
    if timing:
        parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (interleaved)")
        parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--record", action="store_true", help=f"append the results to {RESULTS_PATH.name}")


def apply_common_arguments(args: argparse.Namespace, quiet: bool = False) -> torch.device:
    """Set the thread count and check the device; returns the device. `quiet`: silence the library's log
    warnings and Python warnings (benchmarks that train and test many small models)."""
    if quiet:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    return device


def demo_model(folder: str | Path):
    """The model `vip2clip demo` trains (tiny random CLIP, 128 px, the 'textured' synthetic set), trained in
    `folder`: the model of the accuracy tables on synthetic data."""
    import vip2clip
    from vip2clip.apps.demo import DemoConfig, run_offline_demo

    demo = run_offline_demo(Path(folder) / "demo", config=DemoConfig(), echo=lambda line: None)
    return vip2clip.create_model("tiny", checkpoint=demo.checkpoint)
