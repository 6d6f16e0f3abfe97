"""Tiling: which image score over tiles, what tiling gains on small defects in large images, and its memory.

1. Mosaics of 4 x 4 synthetic parts (128 px each, 512 x 512 in all), half of them with one defective part, scored by
   the model `vip2clip demo` trains (tiny random CLIP, 128 px) with `--tile 128 --tile-overlap 0.25`. Image AUROC of
   the image-score rules: the maximum tile score (the rule `vip2clip` uses), the UTPA-style mean of the stitched
   map's top-K share of pixels (K/grid as in one tile: 2 of 64 patches), the stitched map's maximum, and the
   untiled score (the whole mosaic at 128 px). Pixel AUROC of the stitched map vs the untiled map.
2. A 20 MP image (5472 x 3648) with the tiny model (64 px) and 1024-px tiles: seconds and peak RSS above the
   decoded image, against the bound stated in docs/tiling.md (9 bytes per pixel + 64 MiB).

    python benchmarks/bench_tiling.py --record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import vip2clip
from common import (
    add_common_arguments,
    apply_common_arguments,
    current_rss_mib,
    machine_description,
    markdown_table,
    peak_rss_mib,
    publish,
    reset_peak_rss,
)
from vip2clip.apps.demo import DemoConfig, run_offline_demo
from vip2clip.data.images import load_mask
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.inference.predictor import Predictor
from vip2clip.metrics import image_auroc, pixel_auroc
from vip2clip.scoring.tiling import TileConfig

TOP_SHARE = 2 / 64  # the demo model's top-K (2) of its 8 x 8 patch grid


def mosaics(root: Path, style: str, seed: int, count: int):
    """`count` mosaics (every other one with one defective part): yields (image, mask bool [512, 512], label)."""
    index = generate_benchmark(root, classes=1, seed=seed, style=style, n_train_good=0, n_test_good=32,
                               n_test_defect=4)  # fmt: skip
    good = [s for s in index.samples("test") if not s.anomaly]
    bad = [s for s in index.samples("test") if s.anomaly]
    rng = np.random.default_rng(seed)
    for j in range(count):
        parts = [good[i] for i in rng.choice(len(good), 16, replace=False)]
        mask = np.zeros((512, 512), dtype=bool)
        position = int(rng.integers(16))
        if j % 2:
            parts[position] = bad[(j // 2) % len(bad)]
            top, left = (position // 4) * 128, (position % 4) * 128
            mask[top : top + 128, left : left + 128] = load_mask(index.resolve(parts[position].mask_path))
        image = Image.new("RGB", (512, 512))
        for k, sample in enumerate(parts):
            image.paste(Image.open(index.resolve(sample.img_path)).convert("RGB"), ((k % 4) * 128, (k // 4) * 128))
        yield image, mask, j % 2


def rule_table(checkpoint: Path, root: Path, sets: int, per_set: int) -> str:
    tiled = Predictor.from_checkpoint(checkpoint, backbone="tiny", tiling=TileConfig(128, 0.25))
    plain = Predictor.from_checkpoint(checkpoint, backbone="tiny")
    rows = []
    for style in ("structured", "textured"):
        labels, scores, masks = [], {k: [] for k in ("tile", "topk", "max", "plain")}, []
        maps, plain_maps = [], []
        for k in range(sets):
            for image, mask, label in mosaics(root / f"{style}_{k}", style, 300 + k, per_set):
                result, untiled = tiled.predict(image)[0], plain.predict(image)[0]
                ordered = np.sort(result.anomaly_map.ravel())
                labels.append(label)
                scores["tile"].append(result.pred_score)
                scores["topk"].append(float(ordered[-int(TOP_SHARE * ordered.size) :].mean()))
                scores["max"].append(float(ordered[-1]))
                scores["plain"].append(untiled.pred_score)
                masks.append(mask[::4, ::4])  # every 4th pixel: enough for an AUROC, 16x less memory
                maps.append(result.anomaly_map[::4, ::4])
                plain_maps.append(untiled.anomaly_map[::4, ::4])
        auroc = {name: 100 * image_auroc(np.array(labels), np.array(values)) for name, values in scores.items()}
        pixel_tiled = 100 * pixel_auroc(np.stack(masks), np.stack(maps))
        pixel_plain = 100 * pixel_auroc(np.stack(masks), np.stack(plain_maps))
        rows.append(
            [style, len(labels), *(f"{auroc[k]:.1f}" for k in scores), f"{pixel_tiled:.1f}", f"{pixel_plain:.1f}"]
        )
    header = ["mosaics", "n", "max tile score", "top-K share mean", "map maximum", "untiled score",
              "pixel AUROC tiled", "pixel AUROC untiled"]  # fmt: skip
    return (
        "Demo model (tiny random CLIP, 128 px); 512 x 512 mosaics of sixteen 128-px synthetic parts, half with one "
        "defective part; `--tile 128 --tile-overlap 0.25`. Image AUROC of each image-score rule, pixel AUROC of the "
        "maps (x100).\n\n" + markdown_table(header, rows)
    )


def memory_table() -> str:
    model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4)
    width, height = 5472, 3648
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    rows = []
    for tile, batch in ((1024, 8), (512, 8), (512, 32)):
        predictor = Predictor(model, batch_size=batch, tiling=TileConfig(tile))
        predictor.predict(Image.new("RGB", (64, 64)))
        before = current_rss_mib()
        reset_peak_rss()
        started = time.perf_counter()
        predictor.predict(image)
        seconds = time.perf_counter() - started
        above = peak_rss_mib() - before
        bound = 9 * width * height / 2**20 + 64
        rows.append([tile, batch, f"{seconds:.1f}", f"{above:.0f}", f"{bound:.0f}"])
    return (
        f"A {width} x {height} image (20.0 MP, decoded), tiny model at 64 px, overlap 0.25: `Predictor.predict` time "
        "and peak RSS above the RSS before the call.\n\n"
        + markdown_table(["tile", "batch", "seconds", "peak RSS above MiB", "stated bound MiB"], rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=4, help="synthetic sets per style")
    parser.add_argument("--per-set", type=int, default=12, help="mosaics per set")
    add_common_arguments(parser, timing=False)
    args = parser.parse_args(argv)
    device = apply_common_arguments(args, quiet=True)
    info = machine_description(device)
    with tempfile.TemporaryDirectory() as tmp:
        demo = run_offline_demo(Path(tmp) / "demo", config=DemoConfig(), echo=lambda line: None)
        sections = [rule_table(demo.checkpoint, Path(tmp), args.sets, args.per_set), memory_table()]
    publish("bench_tiling.py: image score over tiles, tiled vs untiled, 20 MP memory", "\n\n".join(sections), info,
            args.record)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
