"""Per-image time of ViP²-CLIP's engines against the authors' release forward, interleaved in one process.

Same random CLIP weights and one random release-format checkpoint for every candidate, one random batch:
  release                the release's test forward as its code computes it (benchmarks/release_baseline.py:
                         OpenAI's sequence-first nn.MultiheadAttention, Conv1d FGP, per-layer upsampling, SciPy)
  predict                `model.predict` (SDPA attention in both towers)
  predict, MHA blocks    `model.predict` through open_clip's own blocks (batch-first nn.MultiheadAttention)
  predict, oneDNN linear / predict, MKL linear
                         `model.predict` with its fp32 linear layers through oneDNN or F.linear (MKL), whatever
                         `vip2clip.model.linear.fp32_library` chose for this CPU (`predict` runs its choice)
  onnxruntime            `vip2clip.load_onnx(model.onnx).predict` (the whole predict exported to ONNX)
  openvino               the same file on OpenVINO's CPU plugin
Then a per-stage split of predict and the release (encoder, text, FGP, scoring, smoothing), and the output checks:
predict vs release (score 1e-4, map 2e-3 relative) and each ONNX engine vs predict (score 1e-4, map 1e-3).

    python benchmarks/bench_engines.py --record                 # ViT-L-14-336, 518 px, batch 1, 5 rounds
    python benchmarks/bench_engines.py --backbone tiny --size 64 --repeats 2 --warmup 1   # a dry run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
from release_baseline import ReleaseBaseline
from vip2clip.model import linear as fast_linear
from vip2clip.model import utpa
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.weights import load_clip
from vip2clip.testing.release_checkpoint import random_release_checkpoint
from vip2clip.utils.cpu_features import cpu_features

CANDIDATES = (
    "release",
    "predict",
    "predict, MHA blocks",
    "predict, oneDNN linear",
    "predict, MKL linear",
    "onnxruntime",
    "openvino",
)


def prepare(args: argparse.Namespace):
    """The model on a seeded random CLIP with a random release checkpoint, the baseline on the same tensors, and
    the ONNX engines (exported into --workdir, reused while the model's identity is the same)."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    release = args.workdir / f"release-{args.backbone}.pth"
    clip, _ = load_clip(args.backbone, None)  # the seeded random weights of --random-init
    checkpoint = random_release_checkpoint(clip.token_embedding.weight.detach(), seed=1)
    torch.save(checkpoint, release)
    model = vip2clip.create_model(args.backbone, checkpoint=release, image_size=args.size, random_init=True)
    model = model.eval()
    clip = model.backbone.clip
    heads = (clip.visual.transformer.resblocks[0].attn.num_heads, clip.transformer.resblocks[0].attn.num_heads)
    baseline = ReleaseBaseline(clip.state_dict(), checkpoint, model.feature_layers, heads, model.config.sigma)
    engines, notes = {}, []
    onnx = args.workdir / f"{args.backbone}-{args.size}.onnx"
    identity = ModelIdentity.of(model, release)
    wanted = [name for name in ("onnxruntime", "openvino") if name not in args.skip]
    if wanted and (not onnx.exists() or vip2clip.load_onnx(onnx).identity.mismatches(identity)):
        start = time.perf_counter()
        vip2clip.export_onnx(model, onnx, checkpoint=release)
        notes.append(f"export_onnx took {time.perf_counter() - start:.0f} s")
    for backend in wanted:
        engines[backend] = vip2clip.load_onnx(onnx, backend=backend, precision="fp32")  # this table is fp32
    return model, baseline, engines, notes


def candidates(model, baseline, engines, images: torch.Tensor, skip: list[str]) -> dict:
    def mha_blocks() -> object:
        model.backbone.sdpa = False
        try:
            return model.predict(images)
        finally:
            model.backbone.sdpa = True

    def with_library(library: str) -> object:
        chosen = fast_linear.fp32_library
        fast_linear.fp32_library = lambda: (library, "forced by the benchmark")
        try:
            return model.predict(images)
        finally:
            fast_linear.fp32_library = chosen

    runs = {
        "release": lambda: baseline.predict(images, model.config.top_k),
        "predict": lambda: model.predict(images),
        "predict, MHA blocks": mha_blocks,
        "predict, oneDNN linear": lambda: with_library("onednn"),
        "predict, MKL linear": lambda: with_library("mkl"),
        **{name: (lambda engine=engine: engine.predict(images.numpy())) for name, engine in engines.items()},
    }
    return {name: run for name, run in runs.items() if name not in skip}


def stages(model, baseline, images: torch.Tensor) -> dict:
    """Per-stage callables of predict ("ours: ...") and of the release, each on the previous stage's outputs."""
    cfg, size = model.config, tuple(images.shape[-2:])
    with torch.no_grad():
        features = model.encode_image(images)
        text = model.encode_text(features.global_feature)
        layer_texts = [model.fgp(text, patches) for patches in features.patch_tokens]
        sims = [utpa.patch_similarity(p, t) for p, t in zip(features.patch_tokens, layer_texts, strict=True)]
        probs = [utpa.state_probabilities(s, cfg.temperature) for s in sims]
        patches, global_feature, grid = baseline.encode_image(images)
        release_text = baseline.encode_text(global_feature)
        release_layer_texts = baseline.layer_texts(release_text, patches)
        release_sims = baseline.similarities(release_layer_texts, patches)

    def ours_scoring() -> object:
        s = [utpa.patch_similarity(p, t) for p, t in zip(features.patch_tokens, layer_texts, strict=True)]
        p = [utpa.state_probabilities(x, cfg.temperature) for x in s]
        return utpa.topk_image_logits(s, p, top_k=cfg.top_k, temperature=cfg.temperature).softmax(-1)

    def release_scoring() -> object:
        return baseline.score(baseline.similarities(release_layer_texts, patches), cfg.top_k)

    parts = {
        "ours: encoder": lambda: model.encode_image(images),
        "ours: text": lambda: model.encode_text(features.global_feature),
        "ours: FGP": lambda: [model.fgp(text, p) for p in features.patch_tokens],
        "ours: scoring": ours_scoring,
        "ours: smoothing": lambda: utpa.smoothed_anomaly_map(probs, grid=features.grid, size=size, sigma=cfg.sigma),
        "release: encoder": lambda: baseline.encode_image(images),
        "release: text": lambda: baseline.encode_text(global_feature),
        "release: FGP": lambda: baseline.layer_texts(release_text, patches),
        "release: scoring": release_scoring,
        "release: smoothing": lambda: baseline.smooth(release_sims, grid, size),
    }

    def no_grad(run):
        def wrapped() -> object:
            with torch.no_grad():
                return run()

        return wrapped

    return {name: no_grad(run) for name, run in parts.items()}


def output_checks(model, baseline, engines, images: torch.Tensor) -> list[list[str]]:
    ours = model.predict(images)
    score, anomaly_map = ours.pred_score.numpy(), ours.anomaly_map.numpy()
    release_score_, release_maps = baseline.predict(images, model.config.top_k)
    rows = [
        [
            "predict vs release",
            f"{np.abs(score - release_score_).max():.1e}",
            f"{(np.abs(anomaly_map - release_maps) / np.abs(release_maps)).max():.1e} (relative)",
            "1e-4 / 2e-3 relative",
        ]
    ]
    for name, engine in engines.items():
        other = engine.predict(images.numpy())
        rows.append(
            [
                f"{name} vs predict",
                f"{np.abs(other.pred_score - score).max():.1e}",
                f"{np.abs(other.anomaly_map - anomaly_map).max():.1e} (absolute)",
                "1e-4 / 1e-3 absolute",
            ]
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip ViT name or 'tiny' (random weights)")
    parser.add_argument("--size", type=int, default=518, help="square input side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--stage-repeats", type=int, default=3, help="interleaved rounds of the per-stage split")
    parser.add_argument("--skip", nargs="*", default=[], choices=CANDIDATES, help="candidates to leave out")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vip2clip_bench_engines"), help="checkpoint, ONNX")
    add_common_arguments(parser, repeats=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_common_arguments(args)
    info = machine_description("cpu")
    print(describe_machine(info), flush=True)
    model, baseline, engines, notes = prepare(args)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    checks = output_checks(model, baseline, engines, images)
    print(markdown_table(("outputs", "max abs. Δ score", "max Δ map", "required"), checks), flush=True)

    runs = candidates(model, baseline, engines, images, args.skip)
    timings = time_interleaved(runs, args.repeats, warmup=args.warmup, rotate=True)
    release = timings.get("release")
    rows = []
    for name, timing in timings.items():
        vs_release = f"**{paired_ratio(release, timing):.3f}x**" if release and name != "release" else "-"
        vs_predict = f"{paired_ratio(timings['predict'], timing):.3f}x" if "predict" in timings else "-"
        rows.append(
            [name, f"{timing.median / args.batch:.3f}", f"{timing.minimum / args.batch:.3f}", vs_release, vs_predict]
        )
    headers = ("engine", "s/image (median)", "s/image (min)", "speed vs release", "speed vs predict")
    print(markdown_table(headers, rows), flush=True)

    split = time_interleaved(stages(model, baseline, images), args.stage_repeats, warmup=1, rotate=True)
    stage_rows = [
        [stage] + [f"{split[f'{side}: {stage}'].median * 1000 / args.batch:.1f}" for side in ("ours", "release")]
        for stage in ("encoder", "text", "FGP", "scoring", "smoothing")
    ]
    stage_headers = ("stage", "predict ms/image", "release ms/image")

    import onnxruntime
    import openvino

    title = f"Engines vs the release forward: {args.backbone} at {args.size} px, batch {args.batch}, CPU fp32"
    body = (
        f"Random weights, one random release-format checkpoint; {args.repeats} interleaved rounds (each starting "
        f"one candidate later) after "
        f"{args.warmup} warm-up; medians; speed ratios are medians of the per-round time ratios (>1: faster than "
        f"the column's reference). `predict` ran its {fast_linear.fp32_library()[1]} "
        f"({cpu_features().describe()}). onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f}.{''.join(' ' + note for note in notes)}\n"
        f"Command: `python benchmarks/bench_engines.py {' '.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, rows)
        + "\n\nPer stage (each on the previous stage's outputs; scoring = similarities, softmax, top-K score):\n\n"
        + markdown_table(stage_headers, stage_rows)
        + "\n\nOutputs on the same image:\n\n"
        + markdown_table(("outputs", "max abs. Δ score", "max Δ map", "required"), checks)
    )
    publish(title, body, info, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
