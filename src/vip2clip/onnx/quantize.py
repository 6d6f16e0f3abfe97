"""INT8 post-training quantization of an exported predict graph (`export_onnx(..., quantize="int8")`).

What is quantized: the image encoder's transformer-block linear layers (attention in/out projections and the MLP,
about 80 % of the encoder's arithmetic), weights per output channel, activations per tensor, calibrated on normal
images. Everything else stays fp32: the patch embedding, the attention products and softmax, the text encoder
(a few tokens), FGP, the UTPA softmax, the top-K score and the smoothing, where a rounding error is amplified by the
0.07 temperature. The result is a QDQ ONNX file (QuantizeLinear/DequantizeLinear around each quantized product)
that ONNX Runtime and OpenVINO both run with INT8 kernels (VNNI, AMX-INT8).

Two quantizers, both made to fit ViT-L/14@336 at 518 px in a few GB: as shipped they hold several copies of the
weighted graph (NNCF peaked at 14 GB, ORT's static quantization passed 24 GB); here the weights stay in the side file.

- "nncf" (default): NNCF's post-training quantization (MinMax ranges, transformer preset) of the graph *without
  its weights*: NNCF and its ONNX Runtime sessions read them from the side file (`BackendParameters.
  EXTERNAL_DATA_DIR`). First a Transpose of a constant weight feeding a MatMul is folded into the weight (torch's
  exporter leaves FGP's query projection so at ViT-L size, and NNCF's SmoothQuant, which ignores the ignored scope,
  fails on it) and small side-file tensors are inlined (ONNX Runtime needs constant shapes before it reads a side
  file). Off, measured (benchmarks/RESULTS.md, issue 26): SmoothQuant (`NNCF_SMOOTH_QUANT_ALPHA`) rewrites every
  MatMul weight, the text encoder's too, in memory (past 11 GB at ViT-L) and moved the demo model's map more
  (Spearman with fp32 0.99961 vs 0.99999); fast bias correction (`NNCF_BIAS_CORRECTION`) adds every quantized
  layer's full output to the statistics run (the CLI's ViT-L peak 10.1 GB with it, 9.0 GB without; a minute more)
  and changed no metric by more than 0.02 points.
- "onnxruntime": ONNX Runtime's `quantize_static` (QDQ, per-channel int8 weights, uint8 activations) given the
  ranges through its calibration cache. They are ORT's MinMax calibration (min of the images' minima, max of their
  maxima) computed from one session of the fp32 graph whose only outputs are a ReduceMin/ReduceMax of each quantized
  layer's input, weights read from the side file; ORT's own calibrator loads the graph twice and reduces every
  MatMul's inputs and outputs (a test checks both give the same ranges). `CalibMaxIntermediateOutputs` is no help:
  ORT 1.32's MinMax calibrator drops what it collected when that count is reached instead of merging it.

Accuracy control (`max_map_drop`) then leaves whole encoder blocks in fp32, the ones whose quantization moves the
map most first, until the map's Spearman rank correlation with the fp32 map is at least 1 - max_map_drop on every
held-out calibration image (rank correlation, not an absolute error: the decision threshold is calibrated
afterwards on the quantized model itself). One ONNX Runtime session per candidate (about two per encoder block),
each from a copy of the quantized graph in memory: at ViT-L/14 only the first step (goal met at once) was run
here (RESULTS.md, issue 26); reverting blocks there takes tens of minutes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vip2clip.onnx.calibration_images import CalibrationImages
from vip2clip.onnx.engine import INPUT_NAME, OUTPUT_NAMES, import_optional

logger = logging.getLogger(__name__)

METHODS = ("nncf", "onnxruntime")
# The exporter records each node's torch call; the vision blocks' linear layers name their weights like this.
_ENCODER_WEIGHT = re.compile(r"p_model_backbone_clip_visual_transformer_resblocks_(\d+)_(\w+?)_(?:weight|bias)\b")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
NNCF_SMOOTH_QUANT_ALPHA = -1.0  # SmoothQuant off (NNCF's default for MatMul is 0.95): see the module docstring
NNCF_BIAS_CORRECTION = False  # NNCF's fast bias correction off: see the module docstring


@dataclasses.dataclass(kw_only=True)
class Int8Report:
    """How a file was quantized (its `vip2clip.quantization` metadata)."""

    method: str
    calibration_images: int
    skipped_images: int
    calibration_source: str
    quantized_layers: int
    fp32_blocks: list[int]
    min_map_spearman: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def encoder_linear_nodes(model: Any) -> dict[str, int]:
    """{node name: 0-based vision block} of the image encoder's block linear layers (MatMul/Gemm) in an exported
    graph, found from the torch call the exporter recorded with each node."""
    nodes = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        recorded = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        match = _ENCODER_WEIGHT.search(recorded)
        if match:
            nodes[node.name] = int(match.group(1))
    return nodes


def quantize_int8(
    source: Path,
    calibration: CalibrationImages,
    *,
    method: str = "nncf",
    max_map_drop: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, Int8Report]:
    """The fp32 exported file `source` -> (INT8 QDQ onnx.ModelProto, report). See the module docstring.

    Works from the file, not a model in memory: ViT-L/14's fp32 graph is 1.6 GB, and the quantizers load their own.
    """
    if method not in METHODS:
        raise ValueError(f"unknown INT8 method {method!r}; choose one of {list(METHODS)}")
    onnx = import_optional("onnx", "INT8 export")
    graph_only = onnx.load(source, load_external_data=False)
    targets = encoder_linear_nodes(graph_only)
    if not targets:
        raise ValueError(f"{source}: no image-encoder linear layers found: export it with this vip2clip version")
    say = progress or (lambda message: None)
    say(f"quantizing {len(targets)} encoder linear layers with {method} on {len(calibration.arrays)} images")
    quantized = (_quantize_nncf if method == "nncf" else _quantize_onnxruntime)(source, calibration.arrays, targets)
    report = Int8Report(
        method=method,
        calibration_images=len(calibration.arrays),
        skipped_images=len(calibration.skipped),
        calibration_source=calibration.source,
        quantized_layers=len(targets),
        fp32_blocks=[],
    )
    if max_map_drop is not None:
        fp32 = _Fp32Source(source, graph_only)
        quantized, report.fp32_blocks, report.min_map_spearman = _accuracy_control(
            fp32, quantized, targets=targets, images=calibration.arrays[-2:], max_drop=max_map_drop, say=say
        )
        report.quantized_layers = sum(1 for block in targets.values() if block + 1 not in report.fp32_blocks)
    return quantized, report


@dataclasses.dataclass
class _Fp32Source:
    """The fp32 file: its graph without weights, and single weights read on demand."""

    path: Path
    graph_only: Any

    def initializer(self, name: str) -> Any:
        onnx = import_optional("onnx", "INT8 export")
        tensor = next(init for init in self.graph_only.graph.initializer if init.name == name)
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        if onnx.external_data_helper.uses_external_data(copy):
            onnx.external_data_helper.load_external_data_for_tensor(copy, str(self.path.parent))
            copy.data_location = onnx.TensorProto.DEFAULT
            del copy.external_data[:]
        return copy


def fold_constant_transposes(model: Any, fp32: _Fp32Source) -> int:
    """Replace each Transpose of an initializer that feeds a MatMul/Gemm by the transposed initializer; returns how
    many. torch's exporter folds these only below a size limit: at ViT-L/14 FGP's query projection reaches its
    MatMul through a Transpose, and NNCF's SmoothQuant, which takes the Transpose's output for a weight, reads no
    value for it and fails (the ignored scope does not apply to SmoothQuant). Only that small weight is loaded."""
    numpy_helper = import_optional("onnx", "INT8 export").numpy_helper
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    readers: dict[str, list] = {}
    for reader, name in ((node, name) for node in graph.node for name in node.input):
        readers.setdefault(name, []).append(reader)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or len(node.input) != 1 or node.input[0] not in initializers:
            continue
        if not all(reader.op_type in ("MatMul", "Gemm") for reader in readers.get(node.output[0], [None])):
            continue
        perm = next((list(attr.ints) for attr in node.attribute if attr.name == "perm"), None)
        value = numpy_helper.to_array(fp32.initializer(node.input[0]))
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.transpose(perm)), node.output[0]))
        graph.node.remove(node)
        readers[node.input[0]].remove(node)
        if not readers[node.input[0]]:  # the untransposed weight is read by nothing else now
            graph.initializer.remove(next(init for init in graph.initializer if init.name == node.input[0]))
        folded += 1
    return folded


def _load_small_initializers(model: Any, fp32: _Fp32Source, limit: int = 1 << 20) -> None:
    """Bring the side file's initializers under `limit` bytes into `model`: ONNX Runtime infers shapes from
    constant inputs (Reshape's shape) while building a session from bytes, before it reads any external data."""
    onnx = import_optional("onnx", "INT8 export")
    for position, tensor in enumerate(model.graph.initializer):
        if onnx.external_data_helper.uses_external_data(tensor):
            length = next((int(entry.value) for entry in tensor.external_data if entry.key == "length"), limit)
            if length < limit:
                model.graph.initializer[position].CopyFrom(fp32.initializer(tensor.name))


def _quantize_nncf(source: Path, arrays: list[np.ndarray], targets: dict[str, int]) -> Any:
    nncf = import_optional("nncf", "INT8 export with NNCF", extra="int8")
    onnx = import_optional("onnx", "INT8 export")
    from nncf.onnx.quantization.backend_parameters import BackendParameters

    logging.getLogger("nncf").setLevel(logging.WARNING)
    # Without its weights: NNCF reads them from the side file, not from each of its copies of the graph.
    model = onnx.load(source, load_external_data=False)
    fp32 = _Fp32Source(source, model)
    fold_constant_transposes(model, fp32)
    _load_small_initializers(model, fp32)
    others = [node.name for node in model.graph.node if node.name not in targets]
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=NNCF_SMOOTH_QUANT_ALPHA),
        disable_bias_correction=not NNCF_BIAS_CORRECTION,
        backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(source.parent.resolve())},
    )
    return nncf.quantize(
        model,
        nncf.Dataset(arrays, lambda array: {INPUT_NAME: array}),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(arrays),
        ignored_scope=nncf.IgnoredScope(names=others, validate=False),
        advanced_parameters=advanced,
    )


def _quantize_onnxruntime(source: Path, arrays: list[np.ndarray], targets: dict[str, int]) -> Any:
    onnx = import_optional("onnx", "INT8 export")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    graph = onnx.load(source, load_external_data=False)
    activations = sorted({node.input[0] for node in graph.graph.node if node.name in targets})
    ranges = activation_ranges(source, graph, activations=activations, arrays=arrays)
    with tempfile.TemporaryDirectory(prefix="vip2clip-int8-") as folder:
        cache, target = Path(folder) / "ranges.json", Path(folder) / "int8.onnx"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        quantize_static(
            str(source),
            str(target),
            None,  # the ranges come from the cache: ORT's own calibrator would hold the whole graph twice more
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=list(targets),
            use_external_data_format=True,
            # No re-quantization of the products' outputs before their bias (NNCF does not either).
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            calibration_cache_path=str(cache),
        )
        return onnx.load(target)


def activation_ranges(
    source: Path, graph_only: Any, *, activations: list[str], arrays: list[np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{activation: (min, max)} over `arrays` as ONNX Runtime's MinMax calibration computes them, from one session
    of the fp32 graph whose outputs are a ReduceMin/ReduceMax per activation; weights read from the side file."""
    onnx = import_optional("onnx", "INT8 export")
    helper, model = onnx.helper, onnx.ModelProto()
    model.CopyFrom(graph_only)
    _load_small_initializers(model, _Fp32Source(source, graph_only))
    del model.graph.output[:]  # only the ranges: the outputs' smoothing and upsampling are not computed
    for name in activations:
        for reduce in ("ReduceMin", "ReduceMax"):
            model.graph.node.append(helper.make_node(reduce, [name], [f"{name}/{reduce}"], keepdims=0))
            model.graph.output.append(helper.make_tensor_value_info(f"{name}/{reduce}", onnx.TensorProto.FLOAT, []))
    session = _session(model, source.parent)
    low = {name: np.float32(np.inf) for name in activations}
    high = {name: np.float32(-np.inf) for name in activations}
    outputs = [output.name for output in model.graph.output]
    for array in arrays:
        values = dict(zip(outputs, session.run(outputs, {INPUT_NAME: array}), strict=True))
        for name in activations:
            low[name] = np.minimum(low[name], values[f"{name}/ReduceMin"])
            high[name] = np.maximum(high[name], values[f"{name}/ReduceMax"])
    return {name: (np.asarray(low[name]), np.asarray(high[name])) for name in activations}


def revert_blocks(fp32: _Fp32Source, quantized: Any, *, targets: dict[str, int], blocks: set[int]) -> Any:
    """A copy of the QDQ `quantized` with the linear layers of the encoder `blocks` back in fp32 (their original
    weights from `fp32`; the unused QuantizeLinear/DequantizeLinear nodes and INT8 weights removed)."""
    onnx = import_optional("onnx", "INT8 export")
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    original = {node.name: list(node.input) for node in fp32.graph_only.graph.node}
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.name not in original or targets.get(node.name) not in blocks:
            continue
        for position, name in enumerate(node.input):
            if producers.get(name) is None or producers[name].op_type != "DequantizeLinear":
                continue
            fp32_name = original[node.name][position]
            if fp32_name not in initializers and fp32_name not in producers:
                weight = fp32.initializer(fp32_name)
                graph.initializer.append(weight)
                initializers[fp32_name] = weight
            node.input[position] = fp32_name
    _prune(model)
    return model


def _prune(model: Any) -> None:
    """Drop nodes and initializers nothing reads any more (the reverted layers' Q/DQ pairs and INT8 weights)."""
    graph = model.graph
    while True:
        needed = {output.name for output in graph.output} | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if node.op_type in _QDQ and not needed.intersection(node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    needed = {name for node in graph.node for name in node.input}
    for init in [init for init in graph.initializer if init.name not in needed]:
        graph.initializer.remove(init)


def _accuracy_control(
    fp32: _Fp32Source, quantized: Any, *, targets: dict[str, int], images: list[np.ndarray], max_drop: float, say
) -> tuple[Any, list[int], float]:
    """Revert encoder blocks to fp32, most map-moving first, until every held-out map's Spearman correlation with
    fp32 is >= 1 - max_drop. Ranking: the agreement with each block alone reverted."""
    reference_session = _session(fp32.path)
    reference = [_maps(reference_session, image) for image in images]
    del reference_session  # one session at a time: at ViT-L/14 each holds the whole graph's weights

    def agreement(candidate: Any) -> float:
        session = _session(candidate)
        return min(_spearman(_maps(session, image), ref) for image, ref in zip(images, reference, strict=True))

    current = agreement(quantized)
    say(f"accuracy control: map Spearman vs fp32 {current:.4f} with every block quantized (goal {1 - max_drop:.4f})")
    if current >= 1 - max_drop:
        return quantized, [], current
    blocks = sorted(set(targets.values()))
    gains = {block: agreement(revert_blocks(fp32, quantized, targets=targets, blocks={block})) for block in blocks}
    reverted: set[int] = set()
    model = quantized
    for block in sorted(blocks, key=lambda b: -gains[b]):
        reverted.add(block)
        model = revert_blocks(fp32, quantized, targets=targets, blocks=reverted)
        current = agreement(model)
        say(f"accuracy control: block {block + 1} back to fp32 -> Spearman {current:.4f}")
        if current >= 1 - max_drop:
            break
    return model, sorted(b + 1 for b in reverted), current


def _session(model: Any, weights: Path | None = None) -> Any:
    """An ONNX Runtime session of a model in memory or of a file; `weights`: the folder of the side file a model
    in memory refers to. Without prepacking: it would keep a second, repacked copy of every weight."""
    ort = import_optional("onnxruntime", "INT8 calibration")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    if weights is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights))
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _maps(session: Any, image: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAMES[1]], {INPUT_NAME: image})[0]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)
