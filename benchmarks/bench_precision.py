"""bf16 and INT8 against fp32 and against the authors' release forward, interleaved in one process.

Speed (ViT-L/14@336 random weights, one random release-format checkpoint, the bench_engines setup): per image the
release's fp32 forward, `predict` fp32 and bf16, the exported file on ONNX Runtime and OpenVINO in fp32, OpenVINO
in bf16 as the engine runs it (image encoder bf16, heads fp32: "exact heads") and as it ran before issue 26 (the
whole graph under one bf16 hint: "whole graph"), and each INT8 file given (--int8 NAME=FILE, written by
`vip2clip export --int8` or `vip2clip.onnx.export.quantize_onnx`) on both runtimes. Each also as
achieved GFLOP/s (the encoders' matrix-product FLOPs per image over its time) and as a fraction of this CPU's GEMM
rate in its precision (ViT-L's four block shapes: oneDNN fp32, oneDNN bf16, INT8 through OpenVINO on a one-MatMul
QDQ model). Then the outputs against `predict` fp32 on the timed image: max score difference, max map difference
over the map's range, and the Spearman rank correlation of the pixel scores.

    python benchmarks/bench_precision.py --int8 nncf=/tmp/int8-nncf.onnx ort=/tmp/int8-ort.onnx --record
    python benchmarks/bench_precision.py --backbone tiny --size 64 --repeats 2 --skip release   # a dry run
    python benchmarks/bench_precision.py --onnx /tmp/scale/vitl-fp32.onnx --skip onnxruntime "predict bf16"  # <6 GB

The accuracy on trained weights (the demo's tiny model on the synthetic benchmark) is bench_precision_accuracy.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import vip2clip
from bench_engines import prepare
from common import (
    add_common_arguments,
    apply_common_arguments,
    describe_machine,
    machine_description,
    markdown_table,
    paired_ratio,
    peak_rss_mib,
    publish,
    time_interleaved,
)
from vip2clip.utils.cpu_features import cpu_features


def encoder_flops(model, size: int) -> float:
    """Matrix-product FLOPs per image of both encoders (block linears and attention; text at its 13 positions)."""
    visual, clip = model.backbone.clip.visual, model.backbone.clip
    tokens = (size // model.backbone.patch_size) ** 2 + 1
    width = int(visual.conv1.out_channels)
    vision = len(visual.transformer.resblocks) * (2 * tokens * 12 * width**2 + 4 * tokens**2 * width)
    text_width, text_tokens = int(clip.token_embedding.weight.shape[1]), model.prompts.text_length
    text = 2 * len(clip.transformer.resblocks) * (2 * text_tokens * 12 * text_width**2)
    return float(vision + text)


def gemm_rates(model, size: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of the vision blocks' four linear shapes at this image size, per precision (best of `repeats`)."""
    width = int(model.backbone.clip.visual.conv1.out_channels)
    tokens = (size // model.backbone.patch_size) ** 2 + 1
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        runs = []
        for k, n in shapes:
            x, w = torch.randn(tokens, k).to(dtype), torch.randn(n, k).to(dtype)
            runs.append(lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
        rates[name] = _rate(runs, tokens, shapes, repeats)
    rates["int8"] = _int8_rate(tokens, shapes, repeats)
    return rates


def _rate(runs, tokens: int, shapes, repeats: int) -> float:
    flops = sum(2 * tokens * k * n for k, n in shapes)
    for run in runs:
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for run in runs:
            run()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def _int8_rate(tokens: int, shapes, repeats: int) -> float:
    """INT8 GEMM rate through OpenVINO: one QDQ MatMul per shape (activations u8 per tensor, weights s8)."""
    import openvino as ov

    from onnx import TensorProto, helper, numpy_helper

    core, runs = ov.Core(), []
    for k, n in shapes:
        weight = np.random.default_rng(0).integers(-100, 100, (k, n), dtype=np.int8)
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["qx"]),
            helper.make_node("DequantizeLinear", ["qx", "sx", "zx"], ["dx"]),
            helper.make_node("DequantizeLinear", ["w", "sw"], ["dw"]),
            helper.make_node("MatMul", ["dx", "dw"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(np.float32(0.05), "sx"),
            numpy_helper.from_array(np.uint8(128), "zx"),
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.float32(0.01), "sw"),
        ]
        graph = helper.make_graph(
            nodes,
            "qdq_matmul",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, n])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU")
        request = compiled.create_infer_request()
        x = np.random.default_rng(1).standard_normal((tokens, k)).astype(np.float32)
        runs.append(lambda request=request, x=x: request.infer({0: x}))
    return _rate(runs, tokens, shapes, repeats)


def candidates(model, baseline, engines: dict, images: torch.Tensor, skip: list[str]) -> dict:
    def predict_in(precision: str):
        def run() -> object:
            model.set_precision(precision)
            try:
                return model.predict(images)
            finally:
                model.set_precision("fp32")

        return run

    array = images.numpy()
    runs = {
        "release fp32": lambda: baseline.predict(images, model.config.top_k),
        "predict fp32": predict_in("fp32"),
        "predict bf16": predict_in("bf16"),
        **{name: (lambda engine=engine: engine.predict(array)) for name, engine in engines.items()},
    }
    return {name: run for name, run in runs.items() if not any(name.startswith(s) for s in skip)}


class WholeGraphBf16:
    """The exported file on OpenVINO under one INFERENCE_PRECISION_HINT=bf16, heads included: what
    `load_onnx(..., precision="bf16")` ran before issue 26, for comparison."""

    def __init__(self, path: Path) -> None:
        import openvino as ov

        self.config = vip2clip.load_onnx(path, backend="onnxruntime").config  # for evaluate()
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        self.request = self.compiled.create_infer_request()

    def predict(self, images: np.ndarray | torch.Tensor) -> vip2clip.ImageBatch:
        """As `OnnxEngine.predict`: numpy in, numpy out; a tensor in, tensors out (evaluate() passes tensors)."""
        array = images.numpy() if isinstance(images, torch.Tensor) else images
        result = self.request.infer({"images": np.ascontiguousarray(array, dtype=np.float32)})
        score, anomaly_map = (np.array(result[self.compiled.output(name)]) for name in ("pred_score", "anomaly_map"))
        if isinstance(images, torch.Tensor):
            return vip2clip.ImageBatch(torch.from_numpy(score), torch.from_numpy(anomaly_map))
        return vip2clip.ImageBatch(score, anomaly_map)


def load_engines(fp32: Path, int8: dict[str, Path], skip: list[str]) -> dict:
    wanted = {
        "onnxruntime fp32": (fp32, "onnxruntime", "fp32"),
        "openvino fp32": (fp32, "openvino", "fp32"),
        "openvino bf16 exact heads": (fp32, "openvino", "bf16"),
        "openvino bf16 whole graph (before)": (fp32, "openvino", "whole"),
    }
    for name, path in int8.items():
        # "fp32": the INT8 layers and fp32 for the rest ("auto" is int8+bf16 on OpenVINO with native bf16)
        wanted[f"onnxruntime int8 ({name})"] = (path, "onnxruntime", "fp32")
        wanted[f"openvino int8 ({name})"] = (path, "openvino", "fp32")
        wanted[f"openvino int8+bf16 ({name})"] = (path, "openvino", "bf16")
    return {
        name: WholeGraphBf16(path)
        if precision == "whole"
        else vip2clip.load_onnx(path, backend=backend, precision=precision)
        for name, (path, backend, precision) in wanted.items()
        if not any(name.startswith(s) for s in skip)
    }


def output_rows(reference, outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[list[str]]:
    score, maps = (np.asarray(t, dtype=np.float64) for t in (reference.pred_score, reference.anomaly_map))
    spread = float(maps.max() - maps.min()) or 1.0
    rows = []
    for name, (other_score, other_maps) in outputs.items():
        rho = spearmanr(np.asarray(other_maps).ravel(), maps.ravel()).statistic
        rows.append(
            [
                name,
                f"{np.abs(other_score - score).max():.1e}",
                f"{np.abs(other_maps - maps).max() / spread:.1e}",
                f"{rho:.5f}",
            ]
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--int8", nargs="*", default=[], metavar="NAME=FILE", help="INT8 exports of the same model")
    parser.add_argument("--skip", nargs="*", default=[], help="candidate name prefixes to leave out")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vip2clip_bench_engines"), help="checkpoint, ONNX")
    parser.add_argument("--onnx", type=Path, help="an fp32 export of the same model (default: exported into --workdir)")
    add_common_arguments(parser, repeats=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_common_arguments(args)
    info = machine_description("cpu")
    print(describe_machine(info), flush=True)
    args.skip = [*args.skip, "onnxruntime", "openvino"]  # bench_engines.prepare: only the export
    model, baseline, _, notes = prepare(args)
    args.skip = args.skip[:-2]
    onnx = args.onnx or args.workdir / f"{args.backbone}-{args.size}.onnx"
    if not onnx.exists():
        vip2clip.export_onnx(model, onnx, checkpoint=args.workdir / f"release-{args.backbone}.pth")
    int8 = {name: Path(path) for name, path in (item.split("=", 1) for item in args.int8)}
    engines = load_engines(onnx, int8, args.skip)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    runs = candidates(model, baseline, engines, images, args.skip)
    reference = model.predict(images)
    outputs = {}
    for name, run in runs.items():
        result = run()
        outputs[name] = (
            (result[0], result[1]) if name.startswith("release") else (result.pred_score, result.anomaly_map)
        )
    checks = output_rows(reference, {k: tuple(np.asarray(v) for v in o) for k, o in outputs.items()})
    print(markdown_table(("outputs vs predict fp32", "max Δ score", "max Δ map / range", "Spearman"), checks))

    timings = time_interleaved(runs, args.repeats, warmup=args.warmup, rotate=True)
    flops = encoder_flops(model, args.size)
    rates = gemm_rates(model, args.size, repeats=3)
    release = timings.get("release fp32")
    rows = []
    for name, timing in timings.items():
        per_image = timing.median / args.batch
        precision = "int8" if "int8" in name else "bf16" if "bf16" in name else "fp32"
        achieved = flops / per_image / 1e9
        rows.append(
            [
                name,
                f"{per_image:.3f}",
                f"**{paired_ratio(release, timing):.2f}x**" if release and name != "release fp32" else "-",
                f"{paired_ratio(timings['predict fp32'], timing):.2f}x" if "predict fp32" in timings else "-",
                f"{achieved:.0f}",
                f"{achieved / rates[precision]:.0%} of {precision}",
            ]
        )
    headers = ("candidate", "s/image", "speed vs release", "speed vs predict fp32", "GFLOP/s", "of GEMM rate")
    print(markdown_table(headers, rows), flush=True)
    rate_line = ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
    title = f"Precision: bf16 and INT8 vs fp32 and the release, {args.backbone} at {args.size} px, batch {args.batch}"
    body = (
        f"CPU: {cpu_features().describe()}. Random weights, one random release checkpoint; {args.repeats} "
        f"interleaved rounds (rotating) after {args.warmup} warm-up; medians; ratios are medians of per-round "
        f"ratios. Matrix-product work {flops / 1e9:.0f} GFLOP per image; GEMM rates of the block shapes here "
        f"(GFLOP/s, best of 3): {rate_line}. Peak RSS of the whole process (every candidate loaded at once): "
        f"{peak_rss_mib():.0f} MiB. Load average (1 min) at the end: {os.getloadavg()[0]:.2f}."
        f"{''.join(' ' + note for note in notes)}\n"
        f"Command: `python benchmarks/bench_precision.py {' '.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, rows)
        + "\n\nOutputs on the timed image against `predict` fp32 (map difference over the fp32 map's range; "
        "Spearman: rank correlation of all pixel scores):\n\n"
        + markdown_table(("outputs vs predict fp32", "max Δ score", "max Δ map / range", "Spearman"), checks)
    )
    publish(title, body, info, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
