"""Training cost with and without the frozen-feature cache (run by hand).

Trains the same model on the same synthetic benchmark twice: `--no-cache` (the image encoder runs on every batch
of every epoch) and cached (one encoder pass into the cache, then every epoch reads memory-mapped rows). Reports
seconds per step and per epoch for both, the one-off cache build (hashing + encoder pass + writing), and the
cache's size on disk per image, measured and as computed for ViT-L/14 at 518 px. Random backbone weights:
speed does not depend on weight values.

    python benchmarks/bench_training.py                                   # tiny backbone, 224 px, 32 images
    python benchmarks/bench_training.py --backbone ViT-L-14-336 --image-size 518 --images 16 --device cuda --record
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import vip2clip
from common import add_common_arguments, append_results, apply_common_arguments, machine_description, markdown_table
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.training.loop import TrainConfig, TrainResult, train

# ViT-L/14 at 518 px: 4 tapped layers x 37*37 patches x 768, plus the 768-d global feature; fp16; packed mask.
VIT_L_CACHE_BYTES = (4 * 37 * 37 * 768 + 768) * 2 + 518 * ((518 + 7) // 8)


def run(args: argparse.Namespace, root: Path, cache: bool) -> tuple[TrainResult, float]:
    """Train once from the same initial weights; returns the result and the total wall-clock seconds."""
    model = vip2clip.create_model(
        args.backbone, image_size=args.image_size, seed=0, device=args.device, random_init=True
    )
    index = vip2clip.data.index.read_index(root / "bench")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, cache=cache)
    started = time.perf_counter()
    result = train(model, index, out_dir=root / ("cached" if cache else "uncached"), config=config)
    return result, time.perf_counter() - started


def summarise(name: str, result: TrainResult, total: float) -> list[object]:
    epochs = [record["seconds"] for record in result.history]
    steps = sum(record["steps"] for record in result.history)
    per_step = sum(epochs) / max(1, steps)
    setup = total - sum(epochs)
    return [name, f"{statistics.median(epochs):.2f}", f"{1000 * per_step:.1f}", f"{setup:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="open_clip ViT name (random weights) or 'tiny'")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32, help="training images (half normal, half defective)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    add_common_arguments(parser, timing=False)
    args = parser.parse_args()
    apply_common_arguments(args)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        half = args.images // 2
        generate_benchmark(
            root / "bench",
            classes=1,
            image_size=args.image_size,
            n_train_good=0,
            n_test_good=args.images - half,
            n_test_defect=half,
        )
        uncached, uncached_total = run(args, root, cache=False)
        cached, cached_total = run(args, root, cache=True)
    per_image = cached.cache_bytes / args.images
    table = markdown_table(
        ["run", "median epoch (s)", "per step (ms)", "setup incl. cache build (s)"],
        [summarise("no cache", uncached, uncached_total), summarise("cache", cached, cached_total)],
    )
    body = (
        f"{args.backbone}, {args.image_size} px, {args.images} images, batch {args.batch_size}, {args.epochs} epochs, "
        f"device {args.device}.\n\n{table}\n\n"
        f"Cache on disk: {cached.cache_bytes / 2**20:.2f} MiB, {per_image / 2**20:.3f} MiB per image "
        f"(ViT-L/14 at 518 px, fp16: {VIT_L_CACHE_BYTES / 2**20:.2f} MiB per image, computed; "
        f"MVTec AD test's 1,725 images: {1725 * VIT_L_CACHE_BYTES / 2**30:.1f} GiB)."
    )
    print(body)
    if args.record:
        append_results(f"bench_training.py, {time.strftime('%Y-%m-%d')}", body, machine_description(args.device))


if __name__ == "__main__":
    main()
