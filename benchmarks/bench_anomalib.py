"""Per-image time through anomalib's Engine against vip2clip's own predict, interleaved in one process.

Same random CLIP weights and one random checkpoint for both; N synthetic images (PNG files, 600 px, so both resize
them to the model's input); batch 1 for both (anomalib's predict loader uses one image per batch):
  vip2clip predict        `Predictor.predict(paths)`: what `vip2clip predict` runs per image, model loaded once
  anomalib Engine.predict `Engine.predict(ViP2CLIP(...), data_path=DIR)`: anomalib's loop, the release
                          PreProcessor, the probability PostProcessor; each call includes Lightning's start of its
                          (empty) validation and predict loops, which the per-image figure spreads over N images
Both compute the same outputs (checked before timing: scores within 1e-5).

    python benchmarks/bench_anomalib.py --record                     # ViT-L-14-336, 518 px, 4 images, 3 rounds
    python benchmarks/bench_anomalib.py --backbone tiny --size 64 --repeats 2 --images 2   # a dry run
The output check before timing runs both paths once (a warm-up of its own).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import vip2clip
from common import (
    add_common_arguments,
    apply_common_arguments,
    describe_machine,
    machine_description,
    markdown_table,
    paired_ratio,
    publish,
    time_interleaved,
)
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import save_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--size", type=int, default=518, help="model input side")
    parser.add_argument("--images", type=int, default=4, help="images per call")
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace, workdir: Path):
    """A random checkpoint, the images, the Predictor and the anomalib model and engine (on the same weights)."""
    from anomalib.engine import Engine

    from vip2clip.integrations.anomalib import ViP2CLIP

    model = vip2clip.create_model(args.backbone, image_size=args.size, seed=0, random_init=True)
    checkpoint = save_checkpoint(workdir / "checkpoint.pt", model.config, state=model.trainable_state_dict())
    n_good = args.images // 2
    generate_benchmark(workdir / "data", classes=1, image_size=600, n_train_good=0, n_test_good=n_good,
                       n_test_defect=args.images - n_good)  # fmt: skip
    folder = workdir / "images"
    folder.mkdir()
    for i, path in enumerate(sorted((workdir / "data").rglob("test/*/*.png"))):
        os.link(path, folder / f"{i:03d}.png")
    paths = sorted(folder.iterdir())
    predictor = vip2clip.Predictor(model, batch_size=1)  # the checkpoint's weights: it was saved from this model
    anomalib_model = ViP2CLIP(checkpoint=checkpoint, visualizer=False, random_init=True)
    engine = Engine(default_root_dir=workdir / "engine", accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return paths, folder, predictor, anomalib_model, engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_common_arguments(args)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    info = machine_description("cpu")
    print(describe_machine(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_anomalib_") as work:
        paths, folder, predictor, model, engine = prepare(args, Path(work))
        ours = np.array([result.pred_score for result in predictor.predict(paths)])
        batches = engine.predict(model, data_path=folder)
        theirs = torch.cat([batch.pred_score for batch in batches]).numpy()
        difference = float(np.abs(ours - theirs).max())
        print(f"max |score difference|: {difference:.2e}", flush=True)
        if difference > 1e-5:
            raise SystemExit("the two paths disagree: not timing them")
        runs = {
            "vip2clip predict": lambda: predictor.predict(paths),
            "anomalib Engine.predict": lambda: engine.predict(model, data_path=folder),
        }
        timings = time_interleaved(runs, args.repeats, warmup=args.warmup, rotate=True)
    n = len(paths)
    ours_timing = timings["vip2clip predict"]
    rows = [
        [name, f"{timing.median / n:.3f}", f"{timing.minimum / n:.3f}", f"{paired_ratio(timing, ours_timing):.3f}x"]
        for name, timing in timings.items()
    ]
    headers = ("path", "s/image (median)", "s/image (min)", "time vs vip2clip predict")
    table = markdown_table(headers, rows)
    import anomalib

    title = f"anomalib Engine vs vip2clip predict: {args.backbone} at {args.size} px, CPU fp32, batch 1"
    body = (
        f"Random weights, one random checkpoint; {n} images of 600 px per call; {args.repeats} interleaved rounds "
        f"(each starting one candidate later) after {args.warmup} warm-up; medians; the ratio is the median of the "
        f"per-round time ratios (>1: slower than vip2clip predict). anomalib {anomalib.__version__}. Scores equal "
        f"(max difference {difference:.1e}). Load average (1 min) at the end: {os.getloadavg()[0]:.2f}.\n"
        f"Command: `python benchmarks/bench_anomalib.py {' '.join(sys.argv[1:])}`\n\n{table}"
    )
    publish(title, body, info, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
