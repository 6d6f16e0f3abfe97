"""Inference cost of ViP²-CLIP against the frozen backbone it sits on.

Per (image size, batch): `model.predict` vs `model.backbone.encode_image` on the same inputs, in the same
process, in interleaved rounds; the ratio is the median of the per-round ratios. The parts of predict beyond
the backbone are timed too: the text encoder (13 truncated positions vs all 77), the heads (text + FGP +
UTPA from precomputed features) and the post-processing (upsampling + Gaussian). Random weights: speed
does not depend on weight values.

    python benchmarks/bench_inference.py                       # ViT-L-14-336 at 518 and 336 px, batch 1 and 2
    python benchmarks/bench_inference.py --device cuda --precision bf16 --sizes 518 --batches 8 --repeats 20
    ... --attention mha        # the encoders through open_clip's own blocks (nn.MultiheadAttention), for comparison

The engines (ONNX Runtime, OpenVINO) against the authors' release forward: benchmarks/bench_engines.py.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import vip2clip
from common import (
    Timing,
    add_common_arguments,
    apply_common_arguments,
    describe_machine,
    machine_description,
    markdown_table,
    paired_ratio,
    publish,
    synchronizer,
    time_interleaved,
)
from vip2clip.model.vip2clip import PRECISIONS, ViP2CLIP

PRECISION_CHOICES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class InferenceRow:
    """One (size, batch) measurement: per-image milliseconds and the paired predict/backbone ratio."""

    size: int
    batch: int
    timings: dict[str, Timing]
    ratio: float

    def per_image_ms(self, name: str) -> float:
        return self.timings[name].median * 1000 / self.batch

    def cells(self) -> list[str]:
        text_share = self.timings["text(13)"].median / self.timings["predict"].median
        return [
            str(self.size),
            str(self.batch),
            f"{self.per_image_ms('backbone'):.1f}",
            f"{self.per_image_ms('predict'):.1f}",
            f"**{self.ratio:.3f}**",
            f"{self.per_image_ms('heads'):.2f}",
            f"{self.per_image_ms('post'):.2f}",
            f"{self.timings['text(13)'].median * 1000:.1f}",
            f"{self.timings['text(77)'].median * 1000:.1f}",
            f"{100 * text_share:.2f}%",
        ]


HEADERS = (
    "size",
    "batch",
    "backbone ms/img",
    "predict ms/img",
    "predict/backbone",
    "heads ms/img",
    "post ms/img",
    "text 13 tok ms/batch",
    "text 77 tok ms/batch",
    "text share of predict",
)


@contextlib.contextmanager
def text_truncation(model: ViP2CLIP, truncate: bool) -> Iterator[None]:
    """Temporarily run the text encoder on the truncated (13) or full (77) prompt length."""
    saved = model.config
    model.config = saved.updated(truncate_text=truncate)
    try:
        yield
    finally:
        model.config = saved


def encoder_autocast(model: ViP2CLIP, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[model.precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def text_encoder(model: ViP2CLIP, global_feature: torch.Tensor, truncate: bool) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad(), text_truncation(model, truncate):
            return model.encode_text(global_feature)

    return run


def measure(model: ViP2CLIP, size: int, batch: int, repeats: int, warmup: int) -> InferenceRow:
    """Interleaved timing of predict, backbone-only and the parts in between, on one random batch."""
    device = model.backbone.clip.visual.proj.device
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch)).to(device)
    features = model.encode_image(images)
    with torch.no_grad():
        output = model.forward_features(features)

    def backbone() -> object:
        with encoder_autocast(model, device):  # the autocast that predict runs the backbone under
            return model.backbone.encode_image(images)

    def heads() -> object:
        with torch.no_grad():
            return model.forward_features(features)

    candidates = {
        "predict": lambda: model.predict(images),
        "backbone": backbone,
        "heads": heads,
        "post": lambda: model.prediction_from_output(output, (size, size)),
        "text(13)": text_encoder(model, features.global_feature, truncate=True),
        "text(77)": text_encoder(model, features.global_feature, truncate=False),
    }
    timings = time_interleaved(candidates, repeats, warmup=warmup, sync=synchronizer(device))
    return InferenceRow(size, batch, timings, paired_ratio(timings["predict"], timings["backbone"]))


def precision_difference(model: ViP2CLIP, size: int, batch: int) -> dict[str, float]:
    """Max |difference| of the score and the anomaly map between the model's precision and fp32, same inputs."""
    device = model.backbone.clip.visual.proj.device
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    precision = model.precision
    low = model.predict(images)
    try:
        exact = model.set_precision("fp32").predict(images)
    finally:
        model.set_precision(precision)
    return {
        "pred_score": float((low.pred_score - exact.pred_score).abs().max()),
        "anomaly_map": float((low.anomaly_map - exact.anomaly_map).abs().max()),
    }


def build_model(args: argparse.Namespace, device: torch.device) -> ViP2CLIP:
    model = vip2clip.create_model(args.backbone, image_size=max(args.sizes), device=device, seed=0, random_init=True)
    model.set_precision(args.precision).eval()
    model.backbone.sdpa = args.attention == "sdpa"
    if args.compile:
        model.compile_encoders()
    return model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip ViT name or 'tiny' (random weights)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 336], help="square input sides in pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32", help="autocast of the encoders")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder blocks first")
    parser.add_argument(
        "--attention", choices=("sdpa", "mha"), default="sdpa", help="SDPA (predict's) or open_clip's MHA blocks"
    )
    parser.add_argument("--output", type=Path, default=None, help="also append the results to this markdown file")
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = apply_common_arguments(args)
    model = build_model(args, device)
    info = machine_description(device)
    print(describe_machine(info))
    print(f"Trainable parameters: {model.num_trainable_parameters():,}")
    print(markdown_table(HEADERS, []), flush=True)
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            row = measure(model, size, batch, args.repeats, args.warmup)
            rows.append(row)
            print(markdown_table(HEADERS, [row.cells()]).splitlines()[-1], flush=True)
    compiled = " compiled" if args.compile else ""
    title = f"Inference: {args.backbone} {args.precision}{compiled}, {args.attention} attention, on {device.type}"
    body = (
        f"Trainable parameters: {model.num_trainable_parameters():,}. Random weights; {args.repeats} interleaved "
        f"rounds after {args.warmup} warm-up; medians; the ratio is the median of per-round predict/backbone.\n\n"
        + markdown_table(HEADERS, [row.cells() for row in rows])
    )
    if args.precision != "fp32":
        diff = precision_difference(model, args.sizes[0], args.batches[-1])
        body += f"\n\n{args.precision} vs fp32, same inputs: max |Δ score| {diff['pred_score']:.2e}, "
        body += f"max |Δ map| {diff['anomaly_map']:.2e}"
    publish(title, body, info, args.record, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
