"""Peak memory of inference: `model.predict` vs the backbone's image forward, batch 8 by default.

Peak resident memory (RSS) of this process, reset before each measurement through Linux's clear_refs, and,
on a GPU, the peak memory held by torch's CUDA allocator. Each figure is also given above the resident
memory of the built model, i.e. what the forward itself needs. Training memory is measured by
bench_training.py.

    python benchmarks/bench_memory.py                      # ViT-L-14-336, 518 px, batch 8, CPU
    python benchmarks/bench_memory.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import vip2clip
from common import (
    add_common_arguments,
    apply_common_arguments,
    current_rss_mib,
    describe_machine,
    machine_description,
    markdown_table,
    peak_rss_mib,
    publish,
    reset_peak_rss,
)

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryRow:
    """Peaks in MiB of one call; the `*_above_model` figures subtract the memory held before the call."""

    name: str
    rss_peak: float
    rss_above_model: float
    cuda_peak: float | None
    cuda_above_model: float | None

    def cells(self) -> list[str]:
        cuda = [f"{self.cuda_peak:.0f}", f"{self.cuda_above_model:.0f}"] if self.cuda_peak is not None else ["-", "-"]
        return [self.name, f"{self.rss_peak:.0f}", f"{self.rss_above_model:.0f}", *cuda]


HEADERS = ("call", "peak RSS MiB", "RSS above model MiB", "peak CUDA MiB", "CUDA above model MiB")


def measure_peak(name: str, function: Callable[[], object], device: torch.device) -> MemoryRow:
    """Run `function` once and return its peak host (and CUDA) memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device) / MIB
    rss_before = current_rss_mib()
    if not reset_peak_rss():
        print("warning: cannot reset the peak RSS here; peaks include everything before", file=sys.stderr)
    function()
    if cuda:
        torch.cuda.synchronize(device)
    rss_peak = peak_rss_mib()
    cuda_peak = torch.cuda.max_memory_allocated(device) / MIB if cuda else None
    return MemoryRow(
        name,
        rss_peak,
        rss_peak - rss_before,
        cuda_peak,
        cuda_peak - cuda_before if cuda_peak is not None else None,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip ViT name or 'tiny' (random weights)")
    parser.add_argument("--size", type=int, default=518, help="square input side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--output", type=Path, default=None, help="also append the results to this markdown file")
    add_common_arguments(parser, timing=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = apply_common_arguments(args)
    model = vip2clip.create_model(args.backbone, image_size=args.size, device=device, seed=0, random_init=True)
    model.set_precision(args.precision).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
    info = machine_description(device)
    print(describe_machine(info))
    model_rss = current_rss_mib()
    rows = [
        measure_peak("backbone.encode_image", lambda: model.encode_image(images), device),
        measure_peak("predict", lambda: model.predict(images), device),
    ]
    title = f"Memory: {args.backbone} {args.precision} predict, batch {args.batch}, {args.size} px on {device.type}"
    body = (
        f"Resident before the calls (model and inputs): {model_rss:.0f} MiB RSS. One call each (backbone first).\n\n"
        + markdown_table(HEADERS, [row.cells() for row in rows])
    )
    publish(title, body, info, args.record, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
