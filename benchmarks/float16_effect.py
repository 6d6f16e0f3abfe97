"""What `--map-dtype float16` (maps rounded to float16 before the pixel metrics) does to pixel AUROC, PRO and F1,
against the exact float32 default (run by hand; docs/evaluation.md quotes it).

1. Synthetic maps of a given spread: 0.5 plus `spread` times (smoothed noise + the smoothed defect mask), clipped to
   [0, 1], 24 images of 256 px, half with defects. The spread is the maps' standard deviation scale: a trained model
   spans most of [0, 1] (spread ~0.2), a random or barely trained one ~1e-3 (a random ViT-L/14@336: std ~3e-4).
2. `--demo-dir DIR`: the model trained by `vip2clip demo --out DIR` (tiny backbone), evaluated with `vip2clip test`
   both ways on the demo's zero-shot test set.
ViT-L/14@336 with random weights: benchmarks/check_release_test.py runs `vip2clip test` both ways.

    python benchmarks/float16_effect.py [--demo-dir vip2clip_demo] [--record]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import append_results, machine_description, markdown_table
from vip2clip.metrics import PIXEL_KEYS, UndefinedMetricWarning, compute_all

SPREADS = (0.2, 0.05, 0.01, 0.002, 5e-4, 1e-4)


def synthetic_class(spread: float, seed: int = 0, n: int = 24, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [n, size, size], float32 maps [n, size, size]) whose values spread by about `spread`."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(0, n, 2):  # every other image has one or two elliptic defects
        for _ in range(1 + i % 3 // 2):
            cy, cx = rng.integers(size // 8, size * 7 // 8, size=2)
            ry, rx = rng.integers(size // 32, size // 8, size=2)
            y, x = np.ogrid[:size, :size]
            masks[i] |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 6, 6))
    noise /= noise.std()
    signal = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 4, 4))
    maps = np.clip(0.5 + spread * (noise + 2.0 * signal), 0.0, 1.0).astype(np.float32)
    return masks, maps


def _pixel(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        values = compute_all(None, None, masks=masks, maps=maps)
    return {key: values[key] for key in PIXEL_KEYS}


def _difference_row(label: str, std: float, exact: dict, rounded: dict) -> list[str]:
    cells = [label, f"{std:.1e}" if np.isfinite(std) else "-"]
    for key in PIXEL_KEYS:
        a, b = 100 * exact[key], 100 * rounded[key]
        cells.append(f"{a:.1f} / {b:.1f} ({b - a:+.1f})" if np.isfinite(b) else f"{a:.1f} / - (undefined)")
    return cells


def synthetic_rows() -> list[list[str]]:
    rows = []
    for spread in SPREADS:
        masks, maps = synthetic_class(spread)
        rows.append(_difference_row(f"synthetic, spread {spread:g}", float(maps.std()), _pixel(masks, maps),
                                    _pixel(masks, maps.astype(np.float16))))  # fmt: skip
    return rows


def demo_rows(demo_dir: Path) -> list[list[str]]:
    """One row per class of the demo's zero-shot test set: `vip2clip test` with float32 and with float16."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            out = Path(tmp) / dtype
            command = [sys.executable, "-m", "vip2clip", "test", "--data", str(demo_dir / "data" / "test_structured"),
                       "--checkpoint", str(demo_dir / "train" / "checkpoint.pt"), "--backbone", "tiny",
                       "--out", str(out), "--map-dtype", dtype, "--no-progress"]  # fmt: skip
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            results[dtype] = {c["name"]: c for c in json.loads((out / "results.json").read_text())["classes"]}
    nan = float("nan")
    rows = []
    for name, exact in results["float32"].items():
        rounded = {key: nan if results["float16"][name][key] is None else results["float16"][name][key]
                   for key in PIXEL_KEYS}  # fmt: skip
        rows.append(_difference_row(f"demo model, class {name}", nan, exact, rounded))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=None, help="output folder of `vip2clip demo`")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows = synthetic_rows() + (demo_rows(args.demo_dir) if args.demo_dir else [])
    headers = ["maps", "std of the maps", "pixel AUROC float32 / float16 (diff)", "PRO", "pixel F1"]
    table = markdown_table(headers, rows)
    print(table)
    if args.record:
        append_results("float16_effect.py: pixel metrics on float16-rounded maps vs float32", table,
                       machine_description())  # fmt: skip


if __name__ == "__main__":
    main()
