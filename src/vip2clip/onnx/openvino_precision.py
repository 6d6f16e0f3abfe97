"""OpenVINO bf16 with exact heads: the image encoder in bf16, everything after it in fp32.

`INFERENCE_PRECISION_HINT=bf16` on OpenVINO's CPU plugin computes the whole exported graph in bf16: FGP, UTPA's
similarities and 0.07-temperature softmax, the top-K and the matrix-product smoothing too (the plugin keeps only
the graph's tail after its last matrix product in fp32, and the smoothing *is* a matrix product). On ViT-L/14
with random weights, whose maps span ~4e-4, that loses the pixel order (Spearman -0.00007 against fp32).

The plugin offers no per-node exception that survives a bf16 hint (tried on OpenVINO 2026.4: neither the fp16
`precise` mark nor `DisablePrecisionConversion` in a node's rt_info, set in Python or through an IR round trip,
kept the heads in fp32: half of their matrix products still ran in bf16), so the graph is split instead:
`split_encoder` cuts the file's graph where the image encoder's tensors leave it, and `ExactHeads` compiles the
encoder for bf16 and the rest (VCA's text path and text encoder, FGP, UTPA, top-K, upsampling and smoothing) for
f32, then runs one after the other. The text encoder stays fp32: it sees 13 positions and is ~0.4 % of the work,
so bf16 would gain nothing there.

The encoder is found by the names the exporter gives the frozen vision blocks' constants
(`...visual.transformer.resblocks.N...`): it is everything the deepest block's operations depend on, less what
depends on the trainable prompts or FGP (constants named `prompts.` / `fgp.`; this keeps a text-block operation out
whose constant the exporter shared with a vision block because the values were equal). The vision tower's last
residual add, its final LayerNorm and projection, and every head thereby land in the fp32 part. The file itself is
not changed: ONNX Runtime still runs it whole, and an INT8 file splits the same way.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The frozen vision blocks' parameters (biases, LayerNorm weights) keep their torch names as constants' names.
_VISION_BLOCK = re.compile(r"visual[._]transformer[._]resblocks[._](\d+)[._]")
# Trainable modules' parameters: what depends on them is a head whatever else it reads.
_HEAD_PARAMETER = re.compile(r"(?:^|[._/])(?:prompts|fgp)[._]")


@dataclass
class Split:
    """The exported graph cut in two: `encoder` (images -> the tensors the heads read), `heads` (those tensors ->
    pred_score, anomaly_map). feeds[i]: which encoder output feeds the heads' i-th input; None: the images."""

    encoder: Any  # openvino.Model
    heads: Any  # openvino.Model
    feeds: tuple[int | None, ...]
    blocks: int  # vision blocks found


def split_encoder(model: Any) -> Split | None:
    """Cut an `openvino.Model` read from an exported file at the image encoder's outputs (the model is consumed:
    its head operations are rewired to new inputs). None when the file's vision blocks cannot be recognised."""
    encoder_ids, blocks = _encoder_nodes(model)
    if not encoder_ids:
        return None
    from openvino import Model
    from openvino import opset13 as ops

    inputs: dict[tuple[int, int], Any] = {}  # (producer, output index) -> the heads' parameter for it
    parameters, results, feeds = [], [], []
    for node in model.get_ordered_ops():
        if node.get_instance_id() in encoder_ids or node.get_type_name() == "Constant":
            continue
        for port in node.inputs():
            source = port.get_source_output()
            producer = source.get_node()
            # Constants are shared by both parts: each compiled model keeps its own copy of what it uses.
            if producer.get_instance_id() not in encoder_ids or producer.get_type_name() == "Constant":
                continue
            key = (producer.get_instance_id(), source.get_index())
            if key not in inputs:
                inputs[key] = ops.parameter(
                    source.get_partial_shape(), source.get_element_type(), f"encoder_{len(feeds)}"
                )
                parameters.append(inputs[key])
                if producer.get_type_name() == "Parameter":
                    feeds.append(None)  # the heads read the images themselves (their batch size)
                else:
                    feeds.append(len(results))
                    results.append(ops.result(source))
            port.replace_source_output(inputs[key].output(0))
    if not results:
        return None
    encoder = Model(results, list(model.get_parameters()), "vip2clip_image_encoder")
    heads = Model(list(model.get_results()), parameters, "vip2clip_heads")
    return Split(encoder, heads, tuple(feeds), blocks)


def _encoder_nodes(model: Any) -> tuple[set[int], int]:
    """(instance ids of the image encoder's operations, number of vision blocks); (empty, 0) if none are found."""
    heads: set[int] = set()
    by_block: dict[int, list[Any]] = collections.defaultdict(list)
    for node in model.get_ordered_ops():  # topological: a node's producers come first
        identity = node.get_instance_id()
        if node.get_type_name() == "Constant":
            if _HEAD_PARAMETER.search(node.get_friendly_name()):
                heads.add(identity)
            continue
        producers = [port.get_source_output().get_node() for port in node.inputs()]
        if any(producer.get_instance_id() in heads for producer in producers):
            heads.add(identity)
            continue
        for producer in producers:
            match = _VISION_BLOCK.search(producer.get_friendly_name())
            if match and producer.get_type_name() == "Constant":
                by_block[int(match.group(1))].append(node)
    if not by_block:
        return set(), 0
    encoder: set[int] = set()
    stack = list(by_block[max(by_block)])  # the deepest block depends on every earlier one
    while stack:
        node = stack.pop()
        identity = node.get_instance_id()
        if identity in encoder or identity in heads:
            continue
        encoder.add(identity)
        stack.extend(port.get_source_output().get_node() for port in node.inputs())
    return encoder, max(by_block) + 1


class ExactHeads:
    """A `Split` compiled as two models on one OpenVINO device: the encoder with `encoder_hint` ("bf16"), the
    heads with "f32"; called like the whole model: images -> (pred_score, anomaly_map)."""

    def __init__(self, core: Any, split: Split, *, device: str, encoder_hint: str = "bf16") -> None:
        self.feeds = split.feeds
        self.encoder = core.compile_model(split.encoder, device, {"INFERENCE_PRECISION_HINT": encoder_hint})
        self.heads = core.compile_model(split.heads, device, {"INFERENCE_PRECISION_HINT": "f32"})
        self._encoder_request = self.encoder.create_infer_request()
        self._heads_request = self.heads.create_infer_request()
        self._outputs = [self.heads.output(name) for name in ("pred_score", "anomaly_map")]

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._encoder_request.infer({0: images})
        # Copied into numpy arrays (a few MB, ms): handing one request's output tensors to the other request
        # without a copy was followed, later in the same process, by a SIGSEGV from the kernel in the test suite.
        return self.run_heads(images, [np.array(result[output]) for output in self.encoder.outputs])

    def run_heads(self, images: np.ndarray, encoder_outputs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """The heads alone on given encoder outputs (arrays, in the encoder's output order)."""
        inputs = {i: images if feed is None else encoder_outputs[feed] for i, feed in enumerate(self.feeds)}
        result = self._heads_request.infer(inputs)
        score, anomaly_map = (np.array(result[output], dtype=np.float32) for output in self._outputs)  # copies
        return score, anomaly_map


def runtime_precisions(compiled: Any, keep: Callable[[str], bool] = lambda layer: True) -> collections.Counter:
    """How many operations of a compiled OpenVINO model run in each precision ("f32", "bf16", "i32", ...), from
    its runtime graph; `keep(layer type)` filters (e.g. only "FullyConnected", "MatMul", "Softmax")."""
    counts: collections.Counter = collections.Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        if keep(info["layerType"].astype(str)):
            counts[info["runtimePrecision"].astype(str)] += 1
    return counts
