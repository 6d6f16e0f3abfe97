"""Batch zero-shot (mutual scoring) on the synthetic benchmarks, and what the mutual step costs per image.

1. Accuracy: the model `vip2clip demo` trains (tiny random CLIP, 128 px, trained on the 'textured' set) on
   `--sets` fresh synthetic benchmarks per style (2 classes) whose test batches are 10, 30 and 50 % defective
   (`--images` test images per class): zero-shot, mutual only (weight 1), fused (the default rule) and 4 normal
   train images as references (`vip2clip test --shots 4`), all through `evaluate`'s per-class path; and the
   share of each batch that looks alike (`mutual.alike_share`). Then the rule's parameters: the fusion weight x
   the share of the others averaged, over every set and rate.
2. Cost at the real size: the mutual step (`mutual.choose_others` + `mutual.mutual_distances` + the maps) on random
   L2-normalised tokens of ViT-L/14's shape at 518 px (4 layers x 1,369 patches x 768, float16) for batches of
   `--batches` images with M = `--others`, each right after the backbone + heads (`model.predict`) of ViT-L-14-336
   at 518 px (random weights: speed does not depend on their values) on one image, batch 1. On a shared CPU the
   step is timed on one tapped layer and multiplied by the layer count (the layers are alike in shape and
   independent; the smallest batch is also timed on all layers to check that), and in the larger batches on the
   rows that cover the first `--pairs` image pairs, scaled by the pair count (every pair costs one [HW, HW]
   similarity block; the distance tables of the whole batch are allocated, so the peak memory is the batch's).

    python benchmarks/bench_mutual.py --record
    python benchmarks/bench_mutual.py --skip-accuracy --record
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vip2clip
from common import (
    add_common_arguments,
    apply_common_arguments,
    current_rss_mib,
    demo_model,
    machine_description,
    markdown_table,
    peak_rss_mib,
    publish,
    reset_peak_rss,
    synchronizer,
)
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.images import load_image
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.class_scoring import choose_shots, class_engine
from vip2clip.evaluation.evaluate import collect_class_outputs
from vip2clip.evaluation.results import ClassBatch, EvalConfig, mean_metrics
from vip2clip.evaluation.tally import class_metrics
from vip2clip.inference.predictor import Predictor
from vip2clip.metrics import PixelStats
from vip2clip.model.identity import ModelIdentity
from vip2clip.scoring.mutual import MutualRule, choose_others, mutual_distances, mutual_maps, predict_mutual
from vip2clip.scoring.mutual_group import score_group

RATES = (0.1, 0.3, 0.5)
WEIGHTS = (0.25, 0.5, 0.75, 1.0)
SHARES = (0.1, 0.3, 0.5)
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel PRO"))
MODES = ("zero-shot", "mutual only (w = 1)", "fused (default rule)", "4 references")


def evaluate_mode(model, index, mode: str, rule: MutualRule) -> dict[str, float]:
    """The mean metrics of `index`'s test split under `mode` (see MODES)."""
    classes = index.classes("test")
    shots = choose_shots(index, classes, shots=4, seed=111) if mode == "4 references" else {}
    mutual = {
        "mutual only (w = 1)": MutualRule(share=rule.share, max_others=rule.max_others, weight=1.0),
        "fused (default rule)": rule,
    }
    config = EvalConfig(mutual=mutual.get(mode))
    identity = ModelIdentity.of(model)
    results = []
    for name in classes:
        engine = class_engine(
            model, identity, files=shots.get(name), tiling=None, batch_size=config.batch_size, cache_dir=None
        )
        dataset = AnomalyDataset(index, "test", classes=[name], image_size=model.config.image_size)
        results.append(class_metrics(name, collect_class_outputs(engine, dataset, config=config)))
    return mean_metrics(results)


def alike(model, index) -> float:
    """The mean over the classes of the share of the test batch that looks alike."""
    shares = []
    for name in index.classes("test"):
        paths = [index.resolve(s.img_path) for s in index.samples("test", [name])]
        group = score_group(Predictor(model, mutual=MutualRule()), paths, load=load_image)
        shares.append(group.report.alike_share)
    return float(np.mean(shares))


def make_sets(root: Path, sets: int, images: int) -> list[tuple[str, float, object]]:
    out = []
    for style in ("structured", "textured"):
        for rate in RATES:
            defect = round(rate * images)
            for k in range(sets):
                out.append((style, rate, generate_benchmark(
                    root / f"{style}_{rate}_{k}", classes=2, seed=2000 + k, style=style, image_size=128,
                    n_train_good=4, n_test_good=images - defect, n_test_defect=defect,
                )))  # fmt: skip
    return out


class _CachedForward:
    """The model with its last batch's forward remembered: the sweep scores one batch under many rules through
    `predict_mutual` and runs the encoder once per batch."""

    def __init__(self, model) -> None:
        self.model, self.config, self._key, self._prediction = model, model.config, None, None

    def predict(self, images: torch.Tensor, return_features: bool = False):
        if self._key is not images:
            self._key, self._prediction = images, self.model.predict(images, return_features=True)
        return self._prediction


def sweep_values(model, index, rules: list[MutualRule]) -> list[dict[str, float]]:
    """Per rule, the mean metrics of `index`'s test classes, each class one batch through `predict_mutual`."""
    per_rule: list[list] = [[] for _ in rules]
    for name in index.classes("test"):
        dataset = AnomalyDataset(index, "test", classes=[name], image_size=model.config.image_size)
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([item["image"] for item in items])
        masks = torch.stack([item["mask"] for item in items]).numpy() > 0.5
        labels = np.array([item["label"] for item in items])
        engine = _CachedForward(model)
        for k, rule in enumerate(rules):
            prediction = predict_mutual(engine, images, rule=rule)
            maps = prediction.anomaly_map.numpy().astype(np.float16)
            outputs = ClassBatch(
                pred_score=prediction.pred_score.numpy(),
                gt_label=labels,
                pixel_rows=np.ones(len(items), bool),
                positions=np.arange(len(items)),
                pixel=PixelStats.of(masks, maps),
            )
            per_rule[k].append(class_metrics(name, outputs))
    return [mean_metrics(results) for results in per_rule]


def _cells(values: list[dict[str, float]]) -> list[str]:
    return [f"{100 * np.mean([v[key] for v in values]):.1f}" for key, _ in METRICS]


def accuracy_tables(model, root: Path, sets: int, images: int) -> str:
    indexes = make_sets(root, sets, images)
    rule = MutualRule()
    rows = []
    for style in ("structured", "textured"):
        for rate in RATES:
            chosen = [index for s, r, index in indexes if (s, r) == (style, rate)]
            share = np.mean([alike(model, index) for index in chosen])
            for mode in MODES:
                values = [evaluate_mode(model, index, mode, rule) for index in chosen]
                rows.append([style, f"{100 * rate:.0f} %", mode, *_cells(values), f"{100 * share:.0f} %"])
    candidates = [MutualRule(share=share, weight=weight) for weight in WEIGHTS for share in SHARES]
    per_set = [sweep_values(model, index, candidates) for _, _, index in indexes]
    sweep = [[f"{c.weight:g}", f"{c.share:g}", *_cells([values[k] for values in per_set])]
             for k, c in enumerate(candidates)]  # fmt: skip
    header = [name for _, name in METRICS]
    return (
        f"Demo model (tiny random CLIP, 128 px, trained on 'textured'); {sets} synthetic set(s) per style and rate, 2 "
        f"classes, {images} test images per class (the batch), 4 normal train images for the references; x100, means "
        f"over the sets. Default rule: share {rule.share}, weight {rule.weight}, M {rule.max_others}, the model's "
        f"sigma. 'alike': the share of the batch that looks alike (mutual.alike_share).\n\n"
        + markdown_table(["test set", "defective", "mode", *header, "alike"], rows)
        + f"\n\nRule parameters, fused, over all {len(indexes)} sets (both styles, all rates; each class one batch "
        "through `vip2clip.predict_mutual`, the encoder run once per class):\n\n"
        + markdown_table(["weight w", "share", *header], sweep)
    )


def _tokens(n: int, layers: int, patches: int, width: int, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.nn.functional.normalize(torch.randn(layers, patches, width, generator=generator), dim=-1)
        .half()
        .to(device)
        for _ in range(n)
    ]


class _Enough(Exception):
    """Stops a timed mutual step after enough pairs (see `time_step`)."""


def time_step(
    tokens: list[torch.Tensor], layers: int, rule: MutualRule, sync, max_pairs: int | None = None
) -> tuple[float, float, float, str]:
    """(wall and CPU seconds per image of the mutual step over the first `layers` layers of `tokens`, the peak RSS
    above before (MiB), how it was timed). With `max_pairs`, the step is stopped once the rows started cover that
    many image pairs, and the time is scaled by the pair count (each pair costs one [HW, HW] similarity block)."""
    used = [t[:layers] for t in tokens]
    others = choose_others([str(i) for i in range(len(used))], max_others=rule.max_others, seed=rule.seed)
    partners = [sum(j > i for j in mine) for i, mine in enumerate(others)]
    total = sum(partners)
    done = [0]

    def stop_after(rows, total=None, desc=""):
        for i in rows:
            if max_pairs is not None and done[0] >= max_pairs:
                raise _Enough
            done[0] += partners[i]
            yield i

    before = current_rss_mib()
    reset_peak_rss()
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        distances = mutual_distances(used, others, share=rule.share, progress=stop_after)
        for distance in distances:
            side = math.isqrt(distance.numel())  # 37 for ViT-L/14 at 518 px
            mutual_maps(distance.view(1, -1), grid=(side, side), size=(14 * side, 14 * side), sigma=8.0)
        how = "whole step"
    except _Enough:
        how = f"{done[0]} of {total} pairs, scaled"
    sync()
    scale = total / done[0] / len(used)
    return (time.perf_counter() - start) * scale, (time.process_time() - cpu) * scale, peak_rss_mib() - before, how


def time_backbone(model, device: torch.device, seed: int, sync) -> tuple[float, float]:
    """(wall, CPU) seconds of one ViT-L-14-336 predict (backbone + heads, with the tokens) on one random image at
    518 px. CPU seconds (this process's threads together) do not count the waits a loaded machine imposes."""
    image = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(seed)).to(device)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    model.predict(image, return_features=True)
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def cost_table(args: argparse.Namespace, device: torch.device) -> str:
    """Per batch size: one backbone image timed, then the mutual step (see the module docstring), so that each
    ratio compares times taken minutes apart at most on a shared machine."""
    sync = synchronizer(device)
    rule = MutualRule(max_others=args.others)
    layers, patches, width = 4, 37 * 37, 768
    model = vip2clip.create_model("ViT-L-14-336", image_size=518, device=device, seed=0, random_init=True)
    model = model.eval()
    time_backbone(model, device, 0, sync)  # warm-up
    rows = []
    for k, n in enumerate(args.batches):
        backbone, backbone_cpu = (1000 * t for t in time_backbone(model, device, 1 + k, sync))
        tokens = _tokens(n, layers, patches, width, device)
        resident = sum(t.numel() * 2 for t in tokens) / 2**20
        others = n - 1 if n - 1 <= rule.max_others else rule.max_others - rule.max_others % 2
        timed = [1, layers] if n == min(args.batches) else [1]
        for used in timed:
            max_pairs = None if n == min(args.batches) else args.pairs
            seconds, cpu, peak, how = time_step(tokens, used, rule, sync, max_pairs)
            wall, cpu = (1000 * t * layers / used for t in (seconds, cpu))
            layers_timed = f"{used} of 4" + (", x4" if used == 1 else "") + f" ({how})"
            cells = [f"{wall:.0f} / {cpu:.0f}", f"{backbone:.0f} / {backbone_cpu:.0f}",
                     f"{wall / backbone:.2f} / {cpu / backbone_cpu:.2f}"]  # fmt: skip
            rows.append([n, others, layers_timed, *cells, f"{resident:.0f}", f"{peak:.0f}"])
        del tokens
    return (
        f"Mutual step on random float16 tokens of ViT-L/14 at 518 px (4 layers x {patches} patches x {width}), "
        f"M = {rule.max_others}, share {rule.share}, {device.type}, search budget 2^24 similarities; before each "
        "batch, ViT-L-14-336 predict (backbone + heads, with the tokens) at 518 px on one image, batch 1. Peak RSS: "
        "above the RSS before the step (the tokens are allocated before it: their size is the 'tokens' column). CPU: "
        "this process's CPU seconds (its threads together), which the waits of a loaded machine do not inflate.\n\n"
        + markdown_table(
            [
                "batch",
                "others per image",
                "layers timed",
                "mutual ms per image (wall / CPU)",
                "backbone ms per image (wall / CPU)",
                "mutual / backbone (wall / CPU)",
                "tokens MiB",
                "peak RSS during the step MiB",
            ],
            rows,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=2, help="synthetic benchmarks per style and rate")
    parser.add_argument("--images", type=int, default=20, help="test images per class (the batch)")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the cost table")
    parser.add_argument("--skip-cost", action="store_true", help="only the accuracy tables")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="batch sizes of the cost")
    parser.add_argument("--others", type=int, default=64, help="M of the cost table")
    parser.add_argument("--pairs", type=int, default=256, help="pairs timed in the larger batches (then scaled)")
    add_common_arguments(parser, timing=False)
    args = parser.parse_args(argv)
    device = apply_common_arguments(args, quiet=True)
    info = machine_description(device)
    sections = []
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            model = demo_model(tmp)
            sections.append(accuracy_tables(model, Path(tmp), args.sets, args.images))
    if not args.skip_cost:
        sections.append(cost_table(args, device))
    publish("bench_mutual.py: batch zero-shot (mutual scoring)", "\n\n".join(sections), info, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
