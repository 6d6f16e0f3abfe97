"""Peak memory and time of one `vip2clip serve` job (decode, predict, JSON and display PNGs) on a large upload.

The server runs one job at a time, so its peak memory is its idle size, plus the admitted uploads (at most
--max-queue of --max-upload-mb), plus one job: this script measures that one job, for a PNG of --megapixels
(default 40, the server's default limit), as peak RSS above the idle process (Linux clear_refs) and per pixel.
The load test in tests/apps/test_serve.py checks the whole server under 20 concurrent clients.

    python benchmarks/bench_serve.py                          # tiny model (random, 64 px), 40 MP
    python benchmarks/bench_serve.py --megapixels 12 --record
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

import vip2clip
from common import (
    add_common_arguments,
    apply_common_arguments,
    machine_description,
    markdown_table,
    peak_rss_mib,
    publish,
    reset_peak_rss,
)
from vip2clip.apps.serve_jobs import predict_upload
from vip2clip.inference.predictor import Predictor


def upload(megapixels: float, seed: int = 0) -> tuple[bytes, tuple[int, int]]:
    """A smooth random PNG of about `megapixels` (4:3), as a camera would send it."""
    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(megapixels * 1e6 / width)
    coarse = np.random.default_rng(seed).integers(0, 256, (max(1, height // 64), max(1, width // 64), 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue(), (width, height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    add_common_arguments(parser, timing=False)
    args = parser.parse_args()
    device = apply_common_arguments(args)
    predictor = Predictor(
        vip2clip.create_model(args.backbone, image_size=args.image_size, device=device, seed=0, random_init=True)
    )
    data, (width, height) = upload(args.megapixels)
    predict_upload(predictor, upload(0.01)[0], max_pixels=width * height)  # warm-up on a small image
    rows = []
    for images in (False, True):
        reset_peak_rss()
        idle = peak_rss_mib()
        start = time.perf_counter()
        predict_upload(predictor, data, max_pixels=width * height, images=images)
        seconds = time.perf_counter() - start
        above = peak_rss_mib() - idle
        rows.append(
            [f"{width}x{height}", f"{len(data) / 2**20:.1f}", str(images).lower(), f"{seconds:.2f}",
             f"{idle:.0f}", f"{above:.0f}", f"{above * 2**20 / (width * height):.1f}"]
        )  # fmt: skip
    headers = ("image", "upload MiB", "images=", "seconds", "idle RSS MiB", "peak above idle MiB", "bytes per pixel")
    body = f"{args.backbone} backbone at {args.image_size} px, device {device}.\n\n" + markdown_table(headers, rows)
    publish("bench_serve.py: one server job on a large upload", body, machine_description(device), args.record)


if __name__ == "__main__":
    main()
