"""Time `convert mvtec` on a 10,000-image tree of tiny files (run by hand: `python benchmarks/bench_convert.py`).

The tree is built in a temporary folder with one tiny PNG copied to every path; conversion lists folders and
pairs masks by name without decoding a single image, so it should take well under a minute.
Appends one line to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from vip2clip.data.converters.mvtec import MVTEC_CLASSES
from vip2clip.data.index import write_index
from vip2clip.data.registry import convert_dataset

DEFECTS = ("crack", "scratch", "hole")


def build_tree(root: Path, n_images: int) -> int:
    """MVTec layout over the 15 classes: 30 % normal test images, the rest defects with masks. Returns files."""
    buffer = io.BytesIO()
    Image.new("L", (2, 2)).save(buffer, format="PNG")
    tiny = buffer.getvalue()
    files = 0
    for c, cls_name in enumerate(MVTEC_CLASSES):
        per_class = n_images // len(MVTEC_CLASSES) + (c < n_images % len(MVTEC_CLASSES))
        n_good = per_class * 3 // 10
        folders = [("good", n_good, False)] + [
            (defect, (per_class - n_good) // len(DEFECTS) + (k < (per_class - n_good) % len(DEFECTS)), True)
            for k, defect in enumerate(DEFECTS)
        ]
        for folder, count, has_mask in folders:
            (root / cls_name / "test" / folder).mkdir(parents=True)
            if has_mask:
                (root / cls_name / "ground_truth" / folder).mkdir(parents=True)
            for i in range(count):
                (root / cls_name / "test" / folder / f"{i:03d}.png").write_bytes(tiny)
                files += 1
                if has_mask:
                    (root / cls_name / "ground_truth" / folder / f"{i:03d}_mask.png").write_bytes(tiny)
                    files += 1
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        files = build_tree(root, args.images)
        start = time.perf_counter()
        result = convert_dataset("mvtec", root)
        write_index(result.index)
        seconds = time.perf_counter() - start
    n_samples = len(result.index.samples())
    line = (
        f"- {datetime.now(timezone.utc):%Y-%m-%d} bench_convert: mvtec layout, {n_samples} images "
        f"({files} files incl. masks), convert + write meta.json in {seconds:.2f} s "
        f"({platform.python_implementation()} {platform.python_version()}, {platform.machine()})"
    )
    print(line)
    with args.results.open("a", encoding="utf-8") as stream:
        stream.write(line + "\n")


if __name__ == "__main__":
    main()
