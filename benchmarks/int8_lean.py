"""An INT8 file of a large export for *timing*, made in little memory: the QDQ structure `export --int8
--int8-method onnxruntime` writes (the image encoder's block linear layers; weights int8 per output channel,
activations uint8 per tensor, no re-quantization of outputs), with activation ranges from a few images.

Why: on this project's shared 23 GB machine the real quantizers could not quantize ViT-L/14 at 518 px (ONNX
Runtime's passed 10 GB, NNCF's was killed at about 8 GB): they hold several copies of the 1.6 GB graph. Here the
ranges come from one ONNX Runtime session of the fp32 file with the 96 activations as extra outputs (its weights
stay in the original side file) and the weights are quantized one at a time. Speed depends on the structure, not
on the range values; accuracy is measured on the tiny model with the real quantizers (bench_precision_accuracy.py).

    python benchmarks/int8_lean.py /tmp/bench/ViT-L-14-336-518.onnx /tmp/bench/int8-lean.onnx --images 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper, numpy_helper

from vip2clip.inference.onnx_engine import INPUT_NAME, META_PRECISION, META_QUANTIZATION
from vip2clip.inference.onnx_quantize import encoder_linear_nodes


def activation_ranges(source: Path, inputs: list[str], images: int, size: int) -> dict[str, tuple[float, float]]:
    graph = onnx.load(source, load_external_data=False)
    for name in inputs:
        graph.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    augmented = source.with_name(".ranges-" + source.name)  # beside it: the weights stay in its side file
    onnx.save(graph, augmented)
    try:
        session = ort.InferenceSession(str(augmented), providers=["CPUExecutionProvider"])
        low, high = {name: np.inf for name in inputs}, {name: -np.inf for name in inputs}
        rng = np.random.default_rng(0)
        for _ in range(images):
            values = session.run(inputs, {INPUT_NAME: rng.standard_normal((1, 3, size, size)).astype(np.float32)})
            for name, value in zip(inputs, values, strict=True):
                low[name], high[name] = min(low[name], float(value.min())), max(high[name], float(value.max()))
    finally:
        augmented.unlink(missing_ok=True)
    return {name: (low[name], high[name]) for name in inputs}


def quantize(source: Path, target: Path, images: int) -> int:
    graph = onnx.load(source, load_external_data=False)
    targets = encoder_linear_nodes(graph)
    nodes = [node for node in graph.graph.node if node.name in targets]
    size = graph.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    ranges = activation_ranges(source, sorted({node.input[0] for node in nodes}), images, size)
    initializers = {init.name: init for init in graph.graph.initializer}
    added, done = [], set()
    for node in nodes:
        activation, weight_name = node.input[0], node.input[1]
        if activation not in done:
            low, high = min(ranges[activation][0], 0.0), max(ranges[activation][1], 0.0)
            scale = (high - low) / 255 or 1.0
            zero = round(-low / scale)
            added += [numpy_helper.from_array(np.float32(scale), activation + "_s"),
                      numpy_helper.from_array(np.uint8(zero), activation + "_z")]  # fmt: skip
            pair = (activation + "_s", activation + "_z")
            graph.graph.node.extend([
                helper.make_node("QuantizeLinear", [activation, *pair], [activation + "_q"]),
                helper.make_node("DequantizeLinear", [activation + "_q", *pair], [activation + "_dq"]),
            ])  # fmt: skip
            done.add(activation)
        tensor = initializers[weight_name]
        external_data_helper.load_external_data_for_tensor(tensor, str(source.parent))
        weight = numpy_helper.to_array(tensor)  # [in, out]
        scales = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127
        added += [numpy_helper.from_array(np.round(weight / scales).astype(np.int8), weight_name + "_i8"),
                  numpy_helper.from_array(scales.astype(np.float32), weight_name + "_ws")]  # fmt: skip
        graph.graph.node.append(helper.make_node("DequantizeLinear", [weight_name + "_i8", weight_name + "_ws"],
                                                 [weight_name + "_dq"], axis=1))  # fmt: skip
        graph.graph.initializer.remove(tensor)
        node.input[0], node.input[1] = activation + "_dq", weight_name + "_dq"
    graph.graph.initializer.extend(added)
    external_data_helper.load_external_data_for_model(graph, str(source.parent))
    _topological_sort(graph.graph)
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    report = {"method": "benchmarks/int8_lean.py (timing only)", "calibration_images": images,
              "quantized_layers": len(nodes)}  # fmt: skip
    metadata |= {META_PRECISION: "int8", META_QUANTIZATION: json.dumps(report)}
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, target)
    return len(nodes)


def _topological_sort(graph) -> None:
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or a missing input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--images", type=int, default=2, help="random images for the activation ranges")
    args = parser.parse_args(argv)
    print(f"quantized {quantize(args.source, args.target, args.images)} layers -> {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
