"""Peak memory and time of evaluating one large class: `collect_class_outputs` + `class_metrics` (run by hand).

    python benchmarks/bench_evaluation.py                          # 1,000 images at 518 px, exact (float32)
    python benchmarks/bench_evaluation.py --images 200 --map-dtype float16 --keep-maps

The model and the dataset are stand-ins (random smooth maps, masks with one defect blob on 60 % of the images)
so that only the evaluation's own memory is measured: the per-batch pixel statistics (the threshold histogram is
derived from them), the maps and masks when kept (`--keep-maps`: as for panels), and the metrics over the whole
class. Appends the figures to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import append_results, machine_description, markdown_table, peak_rss_mib, reset_peak_rss
from vip2clip.evaluation.evaluate import collect_class_outputs
from vip2clip.evaluation.results import MAP_DTYPES, EvalConfig
from vip2clip.evaluation.tally import class_metrics
from vip2clip.outputs import ImageBatch


@dataclass(frozen=True)
class _Sample:
    anomaly: int
    mask_path: str
    cls_name: str = "large"


class StandInDataset(torch.utils.data.Dataset):
    """`AnomalyDataset`'s interface with generated masks; images are [3, 1, 1] placeholders the model ignores."""

    def __init__(self, n: int, size: int) -> None:
        self.image_size = size
        self.samples = [_Sample(int(i % 5 < 3), "mask.png" if i % 5 < 3 else "") for i in range(n)]
        self.labels = [s.anomaly for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        mask = torch.zeros(self.image_size, self.image_size)
        if self.samples[i].anomaly:
            rng = np.random.default_rng(i)
            top, left = rng.integers(0, self.image_size * 3 // 4, size=2)
            mask[top : top + self.image_size // 8, left : left + self.image_size // 6] = 1.0
        label = self.samples[i].anomaly
        return {
            "image": torch.zeros(3, 1, 1),
            "pixels": "",  # no image file: no pixel digest
            "mask": mask,
            "label": label,
            "cls_name": "large",
            "path": "",
            "index": i,
        }


class StandInModel:
    """predict(images [B, ...]) -> random scores and smooth random maps at the dataset's size."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(0)

    def predict(self, images: torch.Tensor) -> ImageBatch:
        batch = images.shape[0]
        coarse = torch.rand(batch, 1, 37, 37, generator=self.generator)
        maps = torch.nn.functional.interpolate(coarse, size=(self.size, self.size), mode="bilinear")[:, 0]
        return ImageBatch(torch.rand(batch, generator=self.generator), maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--map-dtype", choices=sorted(MAP_DTYPES), default=EvalConfig.map_dtype)
    parser.add_argument("--keep-maps", action="store_true", help="keep the class's maps and masks (as for panels)")
    args = parser.parse_args()
    dataset, model = StandInDataset(args.images, args.size), StandInModel(args.size)
    config = EvalConfig(map_dtype=args.map_dtype)
    baseline = peak_rss_mib()
    reset_peak_rss()
    started = time.perf_counter()
    predictions = collect_class_outputs(model, dataset, config=config, keep_maps=args.keep_maps)
    predicted = time.perf_counter()
    result = class_metrics("large", predictions)
    finished = time.perf_counter()
    stats = predictions.pixel
    stored = stats.nbytes
    if args.keep_maps:
        stored += predictions.maps.nbytes + predictions.masks.nbytes
    row = [f"{args.images}x{args.size}x{args.size}", args.map_dtype, "kept" if args.keep_maps else "statistics only",
           f"{stored / 2**20:.0f}", f"{peak_rss_mib():.0f}",
           f"{baseline:.0f}", f"{predicted - started:.1f}", f"{finished - predicted:.1f}"]  # fmt: skip
    headers = ["class", "maps", "kept", "stored statistics (+maps, masks) (MiB)", "peak RSS (MiB)", "RSS before (MiB)",
               "predict loop (s)", "metrics (s)"]  # fmt: skip
    table = markdown_table(headers, [row])
    print(table)
    print({key: round(value, 4) for key, value in result.metrics.items()})
    append_results("bench_evaluation.py: one large class, stand-in model", table, machine_description())


if __name__ == "__main__":
    main()
