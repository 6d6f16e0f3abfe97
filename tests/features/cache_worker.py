"""A separate process that builds or reads a feature cache, for the concurrency tests (run as a script).

    python cache_worker.py BENCH CACHE_DIR SYNC NAME --image-size 64 [--layers 1 2] [--read-until FILE]

It builds the tiny model and dataset, writes SYNC/NAME.ready and waits for SYNC/go, so that all workers start
building at the same moment; then it opens or builds the cache in CACHE_DIR (its encoder slowed down so that
builds overlap), writes SYNC/NAME.opened, and with --read-until keeps reading every row and comparing it with the
first read until that file exists. Its last line on stdout is JSON: slot folder, rows, encoded images, checksum.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

import vip2clip
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.index import read_index
from vip2clip.features.feature_cache import load_or_build_cache


def wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench")
    parser.add_argument("cache_dir")
    parser.add_argument("sync", type=Path)
    parser.add_argument("name")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--read-until", type=Path, default=None)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds added to each encoder batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)  # the test reads whether this process waited for another's build
    model = vip2clip.create_model("tiny", image_size=args.image_size, seed=0, top_k=4, feature_layers=args.layers)
    dataset = AnomalyDataset(read_index(args.bench), image_size=args.image_size)
    encoded = []
    encode = model.backbone.encode_image

    def slow_encode(images):  # this test's own model: widen the window in which builds overlap
        time.sleep(args.delay)
        encoded.append(images.shape[0])
        return encode(images)

    model.backbone.encode_image = slow_encode
    (args.sync / f"{args.name}.ready").touch()
    wait_for(args.sync / "go")
    cache = load_or_build_cache(model, dataset, directory=args.cache_dir, batch_size=2)
    rows = list(range(len(cache)))
    first = cache.features(rows).patch_tokens[0].numpy().copy()
    (args.sync / f"{args.name}.opened").touch()
    reads = 0
    if args.read_until is not None:
        while not args.read_until.exists():
            again = cache.features(rows).patch_tokens[0].numpy()
            if not np.array_equal(again, first):
                raise SystemExit(f"{args.name}: the cached rows changed while being read")
            reads += 1
            time.sleep(0.005)
    print(json.dumps({"slot": str(cache.directory), "rows": len(cache), "encoded": sum(encoded), "reads": reads,
                      "checksum": float(np.abs(first).sum())}))  # fmt: skip


if __name__ == "__main__":
    main()
