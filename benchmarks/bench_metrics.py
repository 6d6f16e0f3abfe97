"""Speed of `vip2clip.metrics.compute_all` against the naive per-threshold evaluation (run by hand).

    python benchmarks/bench_metrics.py                 # 100 maps of 518x518, the full naive loop (minutes)
    python benchmarks/bench_metrics.py --naive-steps 20  # time 20 of the 200 thresholds and scale up

The naive side is what the community code does: scikit-learn for AUROC / AP / precision-recall F1 on the flat
arrays, and the literal 200-threshold AUPRO loop (`vip2clip.testing.metric_oracles.naive_aupro_cflow`).
Appends a table row to benchmarks/RESULTS.md with the machine, library versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vip2clip import metrics
from vip2clip.testing.metric_oracles import naive_aupro_cflow

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HEADER = "# Benchmark results\n\nAppend-only: one table per run of a script in benchmarks/.\n"


def synthetic_class(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """labels int [n], scores float32 [n], masks bool [n, size, size], smooth maps float32 [n, size, size]."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.standard_normal((n, size // 8, size // 8), dtype=np.float32), (0, 1, 1))
    masks = ndimage.zoom(blobs, (1, size / blobs.shape[1], size / blobs.shape[2]), order=1) > 1.6 * blobs.std()
    masks[: n // 3] = False  # a third of the images are normal
    coarse = rng.standard_normal((n, size // 16, size // 16), dtype=np.float32)
    noise = ndimage.zoom(coarse, (1, size / coarse.shape[1], size / coarse.shape[2]), order=1)
    maps = (0.8 * masks + noise + 0.2 * rng.standard_normal(masks.shape, dtype=np.float32)).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    return labels, maps.max(axis=(1, 2)), masks, maps


def naive_max_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision > 0)
    return float(f1.max())


def naive_compute_all(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, steps: int
) -> tuple[dict[str, float], float, float]:
    """Community-style metrics; returns them, the total seconds and the AUPRO loop's seconds (scaled to 200)."""
    start = time.perf_counter()
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    values = {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "image_f1": naive_max_f1(labels, scores),
        "pixel_auroc": roc_auc_score(flat_masks, flat_maps),
        "pixel_f1": naive_max_f1(flat_masks, flat_maps),
    }
    sklearn_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # Every threshold costs the same, so `steps` thresholds over the full range time a fraction of the loop.
    aupro = naive_aupro_cflow(masks, maps, max_step=steps)
    values["pixel_aupro"] = aupro if steps == 200 else float("nan")
    loop_seconds = (time.perf_counter() - start) * 200 / steps
    return values, sklearn_seconds + loop_seconds, loop_seconds


def append_results(rows: list[str]) -> None:
    """Append a table to RESULTS.md in one O_APPEND write, so concurrent benchmark scripts cannot drop each other's
    rows (a read-modify-replace could)."""
    text = ("" if RESULTS.exists() else HEADER) + "\n" + "\n".join(rows) + "\n"
    with RESULTS.open("a", encoding="utf-8") as results:
        results.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--naive-steps", type=int, default=200, help="thresholds of the naive loop to time (<=200)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if not 1 <= args.naive_steps <= 200:
        parser.error("--naive-steps must be between 1 and 200")

    labels, scores, masks, maps = synthetic_class(args.images, args.size)
    print(f"{args.images} maps of {args.size}x{args.size}: {masks.sum()} defect pixels, {masks.size} pixels")
    start = time.perf_counter()
    fast = metrics.compute_all(labels, scores, masks=masks, maps=maps)
    fast_seconds = time.perf_counter() - start
    start = time.perf_counter()
    exact = metrics.aupro(masks, maps, variant="exact")
    exact_seconds = time.perf_counter() - start
    naive, naive_seconds, loop_seconds = naive_compute_all(labels, scores, masks, maps, args.naive_steps)
    for key in metrics.METRIC_KEYS:
        print(f"  {key:12s} fast {fast[key]:.6f}  naive {naive[key]:.6f}")
    ratio = naive_seconds / fast_seconds
    print(f"compute_all {fast_seconds:.2f} s, naive {naive_seconds:.1f} s (AUPRO loop {loop_seconds:.1f} s)")
    print(f"speed-up {ratio:.0f}x (AUPRO loop alone / compute_all: {loop_seconds / fast_seconds:.0f}x)")
    print(f"exact AUPRO {exact:.6f} in {exact_seconds:.2f} s")
    if args.naive_steps != 200:
        print(f"(naive loop timed on {args.naive_steps} of 200 thresholds and scaled)")
    if args.no_write:
        return
    max_error = max(abs(fast[k] - naive[k]) for k in metrics.METRIC_KEYS if not np.isnan(naive[k]))
    append_results(
        [
            f"## bench_metrics.py, {datetime.date.today().isoformat()}",
            "",
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()},"
            f" numpy {np.__version__}, scikit-learn {sklearn.__version__}, torch {torch.__version__};"
            f" load average at the end {os.getloadavg()[0]:.1f}",
            "",
            "| maps | compute_all (s) | naive all six (s) | naive AUPRO loop (s) | speed-up | exact AUPRO (s) |"
            " max abs diff |",
            "|---|---|---|---|---|---|---|",
            f"| {args.images}x{args.size}x{args.size} | {fast_seconds:.2f} | {naive_seconds:.1f} | {loop_seconds:.1f}"
            f"{'' if args.naive_steps == 200 else f' ({args.naive_steps}/200 timed)'} | {ratio:.0f}x"
            f" | {exact_seconds:.2f} | {max_error:.1e} |",
        ]
    )
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
