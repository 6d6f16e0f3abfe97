"""Reference images (few-shot) on the synthetic benchmarks, and what they add per image.

1. Accuracy: the model `vip2clip demo` trains (tiny random CLIP, 128 px, trained on the 'textured' set) evaluated
   zero-shot and with 1/2/4/8 normal train images per class as references (`vip2clip test --shots K`), on
   `--sets` fresh synthetic benchmarks of each style (2 classes, 8 train / 8 normal / 8 anomalous test images
   each); means over the sets. Then the fusion rule's parameters at 4 shots: the reference weight w and the
   reference map's smoothing sigma.
2. Cost: time (interleaved with the plain model, median of `--repeats`) and peak RSS per image of `predict` with a
   4-shot memory vs without, on `--backbone` at `--size` (tiny at 128 px by default; ViT-L-14-336 at 518 px for
   the real size, random weights: speed does not depend on their values).

    python benchmarks/bench_fewshot.py --record
    python benchmarks/bench_fewshot.py --skip-accuracy --backbone ViT-L-14-336 --size 518 --batch 1 --record
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    paired_ratio,
    peak_rss_mib,
    publish,
    reset_peak_rss,
    time_interleaved,
)
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.class_scoring import choose_shots
from vip2clip.evaluation.evaluate import collect_class_outputs
from vip2clip.evaluation.results import EvalConfig, mean_metrics
from vip2clip.evaluation.tally import class_metrics
from vip2clip.model.identity import ModelIdentity
from vip2clip.scoring.references import FusionRule, ReferenceEngine, ReferenceMemory, memory_from_files

SHOTS = (0, 1, 2, 4, 8)
WEIGHTS = (0.25, 0.5, 0.75, 1.0)
SIGMAS = (0.0, 4.0, None)  # None: the model's sigma (8)
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel PRO"))


def evaluate_with(model, index, shots: int, rule: FusionRule, seed: int) -> dict[str, float]:
    """The mean metrics of `index` (test split) with `shots` references per class under `rule` (0: zero-shot)."""
    identity = ModelIdentity.of(model)
    classes = index.classes("test")
    chosen = choose_shots(index, classes, shots=shots, seed=seed) if shots else {}
    results = []
    for name in classes:
        engine = model
        if shots:
            engine = ReferenceEngine(model, memory_from_files(model, identity, paths=chosen[name], rule=rule))
        dataset = AnomalyDataset(index, "test", classes=[name], image_size=model.config.image_size)
        results.append(class_metrics(name, collect_class_outputs(engine, dataset, config=EvalConfig())))
    return mean_metrics(results)


def _cells(values: list[dict[str, float]]) -> list[str]:
    return [f"{100 * np.mean([v[key] for v in values]):.1f}" for key, _ in METRICS]


def accuracy_tables(model, root: Path, sets: int, seed: int) -> str:
    indexes = []
    for style in ("structured", "textured"):
        for k in range(sets):
            indexes.append((style, generate_benchmark(
                root / f"{style}_{k}", classes=2, seed=1000 + k, style=style, image_size=128,
                n_train_good=8, n_test_good=8, n_test_defect=8,
            )))  # fmt: skip
    rows = []
    for shots in SHOTS:
        for style in ("structured", "textured"):
            values = [evaluate_with(model, i, shots, FusionRule(), seed) for s, i in indexes if s == style]
            rows.append(
                [style, shots or "zero-shot", *(f"{100 * np.mean([v[k] for v in values]):.1f}" for k, _ in METRICS)]
            )
    sweep = []
    for weight in WEIGHTS:
        for sigma in SIGMAS:
            rule = FusionRule(weight, sigma)
            values = [evaluate_with(model, i, 4, rule, seed) for _, i in indexes]
            sigma_text = "model's (8)" if sigma is None else f"{sigma:g}"
            sweep.append(
                [f"{weight:g}", sigma_text, *(f"{100 * np.mean([v[k] for v in values]):.1f}" for k, _ in METRICS)]
            )
    header = [name for _, name in METRICS]
    return (
        f"Demo model (tiny random CLIP, 128 px, trained on 'textured'); {sets} synthetic set(s) per style, 2 classes, "
        f"8 train / 8 normal / 8 anomalous test images per class; x100, means over the sets. Rule: weight "
        f"{FusionRule().weight}, the model's sigma.\n\n"
        + markdown_table(["test set", "shots", *header], rows)
        + f"\n\nRule parameters at 4 shots, both styles ({2 * sets} sets):\n\n"
        + markdown_table(["weight w", "sigma", *header], sweep)
    )


def cost_table(args: argparse.Namespace, device: torch.device) -> str:
    """Time and peak RSS per image of model.predict vs the 4-shot ReferenceEngine.predict."""
    model = vip2clip.create_model(args.backbone, image_size=args.size, device=device, seed=0, random_init=True)
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(4, 3, args.size, args.size, generator=generator).to(device)
    tokens = model.encode_image(references).patch_tokens
    memory = ReferenceMemory(tokens=tuple(t.reshape(-1, t.shape[-1]).half() for t in tokens), files=())
    engine = ReferenceEngine(model, memory)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(device)
    timings = time_interleaved(
        {"model": lambda: model.predict(images), "4 shots": lambda: engine.predict(images)},
        args.repeats,
        warmup=args.warmup,
    )
    peaks = {}
    for name, call in (("model", lambda: model.predict(images)), ("4 shots", lambda: engine.predict(images))):
        before = current_rss_mib()
        reset_peak_rss()
        call()
        peaks[name] = peak_rss_mib() - before
    base, fused = timings["model"], timings["4 shots"]
    rows = [
        ["model.predict", f"{1000 * base.median / args.batch:.1f}", "1.000", f"{peaks['model']:.0f}"],
        [
            "with a 4-shot memory",
            f"{1000 * fused.median / args.batch:.1f}",
            f"{paired_ratio(fused, base):.3f}",
            f"{peaks['4 shots']:.0f}",
        ],
    ]
    return (
        f"{args.backbone}, {args.size} px, batch {args.batch}, {device.type}; memory of 4 images: "
        f"{memory.n_patches} patches x {len(memory.tokens)} layers, "
        f"{sum(t.numel() * 2 for t in memory.tokens) / 2**20:.1f} MiB (float16). "
        f"Median of {args.repeats} interleaved rounds.\n\n"
        + markdown_table(["call", "ms per image", "ratio to model", "peak RSS above the model MiB"], rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=3, help="synthetic benchmarks per style")
    parser.add_argument("--seed", type=int, default=111, help="seed choosing the shots")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the cost table")
    parser.add_argument("--backbone", default="tiny", help="backbone of the cost table (random weights)")
    parser.add_argument("--size", type=int, default=128, help="input size of the cost table")
    parser.add_argument("--batch", type=int, default=8, help="batch of the cost table")
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    device = apply_common_arguments(args, quiet=True)
    info = machine_description(device)
    sections = []
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            model = demo_model(tmp)
            sections.append(accuracy_tables(model, Path(tmp), args.sets, args.seed))
    sections.append(cost_table(args, device))
    publish("bench_fewshot.py: reference images (few-shot)", "\n\n".join(sections), info, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
