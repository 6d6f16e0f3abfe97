"""Shared helpers of the benchmark scripts: machine description, interleaved timing, peak memory, RESULTS.md.

Timing is interleaved: every repetition runs each candidate once, in turn, so that the load of a shared
machine (other processes, thermal state) falls on all candidates alike; the median and the paired
per-repetition ratio are then robust to a few disturbed repetitions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import logging
import os
import platform
import re
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one candidate, one entry per repetition (same order as the other candidates')."""

    name: str
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU): call it inside timed regions."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    rotate: bool = False,
) -> dict[str, Timing]:
    """Run each candidate `warmup` times, then `repeats` rounds of one call each in turn; return their timings.

    `sync` is called before starting and before stopping each clock (GPU work is asynchronous). `rotate` starts
    each round one candidate later, so that none always follows the same one (runtimes whose threads stay busy
    for a moment after a call would otherwise always slow the same neighbour).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for function in candidates.values():
            function()
    sync()
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(repeats):
        shift = round_index % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            function = candidates[name]
            sync()
            start = time.perf_counter()
            function()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(name, tuple(values)) for name, values in seconds.items()}


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over repetitions of numerator/denominator, pairing the runs of the same round."""
    return statistics.median(a / b for a, b in zip(numerator.seconds, denominator.seconds, strict=True))


def machine_description(device: torch.device | str = "cpu") -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, threads, accelerator, torch, Python, date."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "cpu flags": _cpu_flags(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        # Other processes on a shared machine slow small operations most: say how busy it was.
        "load avg (1 min, at start)": f"{os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _cpu_flags() -> str:
    """The vector-unit flags that decide CPU matrix-product speed (AVX2, AVX-512, bf16, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"^flags\s*:\s*(.+)$", text, flags=re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return " ".join(flag for flag in wanted if flag in flags) or "none of avx2/avx512/amx"


def describe_machine(info: dict[str, str]) -> str:
    """One line: `key: value; key: value`."""
    return "; ".join(f"{key}: {value}" for key, value in info.items())


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux `clear_refs`); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_mib() -> float:
    """Resident memory now (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB since the last `reset_peak_rss` (or since it started)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


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
