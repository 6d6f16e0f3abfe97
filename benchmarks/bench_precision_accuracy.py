"""What bf16 and INT8 cost in accuracy on trained weights: the demo's tiny model on its zero-shot synthetic benchmark.

`vip2clip demo --out DIR` trains the tiny model and writes the benchmark; this evaluates that checkpoint on DIR's
zero-shot test set with `predict` fp32 and bf16, the fp32 export on ONNX Runtime, OpenVINO in bf16 as the engine
runs it (image encoder bf16, heads fp32) and as it ran before issue 26 (the whole graph in bf16), and INT8 exports
(NNCF and ONNX Runtime quantization, calibrated on normal images of a freshly generated benchmark of the same
style, not the evaluated ones) on both runtimes, OpenVINO also in bf16 for what is not INT8. Reports image AUROC,
pixel AUROC and AUPRO (points, x100) with their differences to fp32, and the Spearman rank correlation of all pixel
scores with fp32's.

    python benchmarks/bench_precision_accuracy.py --demo /tmp/demo --record
    python benchmarks/bench_precision_accuracy.py --demo /tmp/demo --methods   # no INT8 exports (a few minutes less)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import vip2clip
from bench_precision import WholeGraphBf16
from common import add_common_arguments, apply_common_arguments, machine_description, markdown_table, publish
from vip2clip.data.images import load_image
from vip2clip.data.index import read_index
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.transforms import preprocess_array
from vip2clip.evaluation.evaluate import EvalConfig, evaluate

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def engines(model, checkpoint: Path, work: Path, methods: list[str]) -> tuple[dict, list[str]]:
    """name -> an object with .predict and .config; and notes on how the exports were made."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = vip2clip.export_onnx(model, work / "fp32.onnx", checkpoint=checkpoint)
    calibration = work / "calibration"
    if not calibration.exists():
        generate_benchmark(calibration, classes=2, seed=999, image_size=128, n_train_good=16, n_test_good=0,
                           n_test_defect=1, style="structured")  # fmt: skip
    goods = sorted(calibration.glob("*/train/good/*.png"))
    found = {
        "onnxruntime fp32": vip2clip.load_onnx(fp32, backend="onnxruntime"),
        "openvino bf16 exact heads": vip2clip.load_onnx(fp32, backend="openvino", precision="bf16"),
        "openvino bf16 whole graph (before)": WholeGraphBf16(fp32),
    }
    notes = []
    for method in methods:
        start = time.perf_counter()
        path = vip2clip.export_onnx(model, work / f"int8-{method}.onnx", checkpoint=checkpoint, quantize="int8",
                                    calibration_images=goods, int8_method=method)  # fmt: skip
        notes.append(f"INT8 {method}: {len(goods)} calibration images, export {time.perf_counter() - start:.0f} s")
        found[f"onnxruntime int8 ({method})"] = vip2clip.load_onnx(path, backend="onnxruntime")
        found[f"openvino int8 ({method})"] = vip2clip.load_onnx(path, backend="openvino")
        found[f"openvino int8+bf16 ({method})"] = vip2clip.load_onnx(path, backend="openvino", precision="bf16")
    return found, notes


class TorchAt:
    """`model` at a precision, as an engine."""

    def __init__(self, model, precision: str) -> None:
        self.model, self.precision, self.config = model, precision, model.config

    def predict(self, images):
        self.model.set_precision(self.precision)
        try:
            return self.model.predict(images)
        finally:
            self.model.set_precision("fp32")

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def all_maps(engine, index, size: int) -> np.ndarray:
    arrays = [preprocess_array(load_image(Path(index.root) / s.img_path), size) for s in index.samples("test")]
    maps = [np.asarray(engine.predict(np.stack(arrays[i : i + 8])).anomaly_map) for i in range(0, len(arrays), 8)]
    return np.concatenate(maps).ravel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="output folder of `vip2clip demo`")
    parser.add_argument("--methods", nargs="*", default=["nncf", "onnxruntime"], help="INT8 quantizers")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vip2clip_bench_precision_accuracy"))
    add_common_arguments(parser, timing=False)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    checkpoint = args.demo / "train" / "checkpoint.pt"
    model = vip2clip.create_model(checkpoint=checkpoint).eval()
    index = read_index(args.demo / "data" / "test_structured")
    candidates = {"predict fp32": TorchAt(model, "fp32"), "predict bf16": TorchAt(model, "bf16")}
    exported, notes = engines(model, checkpoint, args.workdir, args.methods)
    candidates |= exported
    reference_maps = all_maps(candidates["predict fp32"], index, model.config.image_size)
    results, rows = {}, []
    for name, engine in candidates.items():
        results[name] = evaluate(engine, index, config=EvalConfig(batch_size=8)).mean
        rho = spearmanr(all_maps(engine, index, model.config.image_size), reference_maps).statistic
        cells = []
        for key in METRICS:
            value, base = 100 * results[name][key], 100 * results["predict fp32"][key]
            cells.append(f"{value:.2f} ({value - base:+.2f})")
        rows.append([name, *cells, f"{rho:.5f}"])
        print(rows[-1], flush=True)
    headers = ("candidate", "image AUROC (Δ)", "pixel AUROC (Δ)", "AUPRO (Δ)", "pixel Spearman vs fp32")
    body = (
        f"The demo's trained tiny model ({checkpoint}) on its zero-shot benchmark ({index.root}, "
        f"{len(index.samples('test'))} test images, {model.config.image_size} px); metrics x100, Δ = points "
        f"against `predict` fp32. {'; '.join(notes)}.\n"
        f"Command: `python benchmarks/bench_precision_accuracy.py {' '.join(sys.argv[1:])}`\n\n"
        + markdown_table(headers, rows)
    )
    publish("Precision: accuracy of bf16 and INT8 on the demo's trained tiny model", body,
            machine_description("cpu"), args.record)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
