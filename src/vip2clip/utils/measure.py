"""Measuring computations: interleaved wall-clock timing, peak memory (GPU allocator or process RSS) and the
machine a number was measured on. Used by `vip2clip study efficiency` and the benchmark scripts.

Timing is interleaved: every repetition runs each candidate once, in turn, so that the load of a shared
machine (other processes, thermal state) falls on all candidates alike; the median and the paired
per-repetition ratio are then robust to a few disturbed repetitions.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


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
    *,
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
