"""The ONNX engine: a model exported by `vip2clip.export_onnx` run by ONNX Runtime or OpenVINO, without torch.

    engine = vip2clip.load_onnx("model.onnx")                        # ONNX Runtime, CPU
    engine = vip2clip.load_onnx("model.onnx", backend="openvino")    # OpenVINO's CPU plugin, same file
    prediction = engine.predict(images)  # [B, 3, S, S] float32, normalised -> ImageBatch([B], [B, S, S])

The file holds the whole predict (image encoder, VCA's per-image text path, FGP, top-K score, upsampled and
smoothed map) and, in its metadata, the model's identity (`ModelIdentity`: checkpoint hash, CLIP weights
fingerprint, image size, top-K, sigma, full config) and the package version: `engine.config` and
`engine.identity` come from there, so calibration files are checked against an ONNX model exactly as against
the torch model it was exported from. This module imports numpy and the chosen runtime only; `Predictor(engine)`
then runs preprocessing and map resizing on numpy and PIL, so a deployment needs no torch at all.

Precision (`engine.precision`, and `engine.precision_reason` says why): "auto" computes in bf16 where that is
both fast and exact enough, i.e. OpenVINO on a CPU with native bf16, with only the image encoder in bf16 and the
heads in fp32 (`vip2clip.onnx.openvino_precision`); fp32 elsewhere. An INT8 file keeps its INT8 layers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from vip2clip.config import ModelConfig
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.preprocessing import preprocess_array
from vip2clip.onnx.load_errors import OnnxLoadError, load_problem
from vip2clip.onnx.openvino_precision import ExactHeads, runtime_precisions, split_encoder
from vip2clip.outputs import ImageBatch
from vip2clip.utils.cpu_features import auto_precision, cpu_features

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

FORMAT = "vip2clip-onnx/1"
META_FORMAT = "vip2clip.format"
META_IDENTITY = "vip2clip.identity"  # ModelIdentity.to_dict() as JSON
META_VERSION = "vip2clip.version"
META_PRECISION = "vip2clip.precision"  # "int8" for a quantized file; absent: fp32
META_QUANTIZATION = "vip2clip.quantization"  # how it was quantized and calibrated (JSON; Int8Report)
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_score", "anomaly_map")
BACKENDS = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")  # what the runtime computes in; "fp32": as the file (fp32 or INT8)
AS_FILE = {"int8": "INT8 layers, the rest fp32"}  # what a file computes in as it is (else "fp32")
# backend="auto": the faster runtime per precision on this project's CPU (benchmarks/RESULTS.md, bench_precision.py);
# ONNX Runtime when OpenVINO is not installed (it has no bf16 CPU path).
FASTER_BACKEND = {"fp32": "openvino", "bf16": "openvino"}  # an INT8 file: as fp32

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
_ALL_BF16_WARNING = (
    "bf16 on OpenVINO runs FGP, UTPA's softmax and the smoothing in bf16 too here (the file's image encoder was "
    "not recognised, so the heads cannot be kept in fp32): its maps move more than torch's --precision bf16 "
    "(docs/precision.md); prefer fp32, torch bf16 or an INT8 export for maps"
)


class MissingDependencyError(ImportError):
    """An optional package of the `onnx` extra is not installed."""


def import_optional(name: str, purpose: str, *, extra: str = "onnx") -> ModuleType:
    """Import `name` or raise MissingDependencyError naming the package extra that provides it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise MissingDependencyError(
            f"{purpose} needs the {name!r} package, which is not installed: pip install 'vip2clip[{extra}]'"
        ) from error


class OnnxEngine:
    """An exported ViP²-CLIP on ONNX Runtime or OpenVINO: `predict` takes what `ViP2CLIP.predict` takes.

    config: the ModelConfig the model was exported with (image_size is the export's input size).
    identity: the ModelIdentity recorded at export (calibrations are checked against it).
    providers: what the model runs on (ONNX Runtime's execution providers in use, or the OpenVINO device);
    available: what the runtime offers on this machine.
    precision: what computes: "fp32", "bf16" (OpenVINO: the image encoder in bf16, the heads in fp32), "int8" (an
    INT8 file: its INT8 layers, the rest fp32) or "int8+bf16"; precision_reason: one line on why (what "auto"
    chose, or "as asked"), for logs and prediction metadata.
    parts: on OpenVINO in bf16, the encoder and heads compiled apart (`openvino_precision.ExactHeads`); else None.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        backend: str = "auto",
        precision: str = "auto",
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown ONNX backend {backend!r}; choose one of {list(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown engine precision {precision!r}; choose one of {list(PRECISIONS)}")
        self.backend = _choose_backend(backend, precision)
        if precision == "bf16" and self.backend == "onnxruntime":
            raise ValueError(
                "ONNX Runtime has no bf16 CPU kernels: it would run this file in fp32. For bf16 use "
                "backend='openvino' (or 'auto'; pip install 'vip2clip[openvino]'), or drop bf16"
            )
        if self.path.stat().st_size == 0:
            raise OnnxLoadError(f"{self.path} is empty (0 bytes): not an ONNX model (copy it again, or export again)")
        open_backend = _onnxruntime if self.backend == "onnxruntime" else _openvino
        opened = open_backend(self.path, providers, precision)
        self._run, self.parts, metadata = opened.run, opened.parts, opened.metadata
        self.providers, self.available = opened.providers, opened.available
        self.identity, self.config = read_metadata(metadata, self.path)
        self.file_precision = metadata.get(META_PRECISION, "fp32")
        # How an INT8 file was quantized and calibrated (`vip2clip.onnx.quantize.Int8Report`); else None.
        self.quantization = json.loads(metadata[META_QUANTIZATION]) if META_QUANTIZATION in metadata else None
        self.precision, self.precision_reason = opened.precision, opened.reason

    def __repr__(self) -> str:
        return (
            f"OnnxEngine({str(self.path)!r}, backend={self.backend!r}, precision={self.precision!r}, "
            f"image_size={self.config.image_size})"
        )

    def describe(self) -> str:
        """What runs: the runtime, the precision of the file and of the computation, and why (for logs)."""
        runtime = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}[self.backend]
        heads = "fp32 heads (text path, FGP, UTPA, top-K, smoothing)" if self.parts else "bf16 heads too"
        kernels = {
            "fp32": "fp32",
            "bf16": f"bf16 image encoder, {heads}",
            "int8": "INT8 encoder linear layers, the rest fp32",
            "int8+bf16": f"INT8 encoder linear layers, the rest of the image encoder bf16, {heads}",
        }[self.precision]
        return (
            f"{runtime} running the {self.file_precision} file {self.path.name} in {kernels}; {self.precision_reason}"
        )

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode, any size) -> the normalised float32 array [3, S, S] this export takes, S its input
        size (no torch): `engine.predict(np.stack([engine.preprocess(image) for image in images]))`."""
        return preprocess_array(image, self.config.image_size)

    def predict(self, images: np.ndarray | torch.Tensor) -> ImageBatch:
        """images [B, 3, S, S] (normalised; numpy or torch) -> ImageBatch(pred_score [B], anomaly_map [B, S, S]).

        Numpy in, numpy out; a torch tensor in gives torch tensors out (on the CPU), like `ViP2CLIP.predict`.
        """
        is_tensor = hasattr(images, "detach")
        array = images.detach().float().cpu().numpy() if is_tensor else np.asarray(images, dtype=np.float32)
        size = self.config.image_size
        if array.ndim != 4 or array.shape[1:] != (3, size, size):
            raise ValueError(f"{self.path.name} takes images [B, 3, {size}, {size}]; got {tuple(array.shape)}")
        if array.shape[0] == 0:
            score, anomaly_map = np.zeros(0, np.float32), np.zeros((0, size, size), np.float32)
        else:
            score, anomaly_map = self._run(np.ascontiguousarray(array))
        if is_tensor:
            import torch  # already loaded: the caller passed a tensor

            return ImageBatch(torch.from_numpy(score), torch.from_numpy(anomaly_map))
        return ImageBatch(score, anomaly_map)


def load_onnx(
    path: str | Path, *, providers: Sequence[str] | None = None, backend: str = "auto", precision: str = "auto"
) -> OnnxEngine:
    """Load a model exported by `vip2clip.export_onnx` (fp32 or INT8; no torch needed).

    Returns: an `OnnxEngine` (`predict` as `ViP2CLIP.predict`, the exported model's `config` and `identity`).
    Raises: MissingDependencyError (the runtime is not installed: an ImportError naming the extra);
    FileNotFoundError; ValueError for a damaged file or one not written by `export_onnx`.

    Example:
        >>> engine = vip2clip.load_onnx("model.onnx")  # doctest: +SKIP
        >>> predictor = vip2clip.Predictor(engine)  # doctest: +SKIP

    Args:
    providers: ONNX Runtime execution providers in order of preference (default ["CPUExecutionProvider"]; e.g.
        ["CUDAExecutionProvider", "CPUExecutionProvider"] with onnxruntime-gpu). With backend="openvino" the first
        entry names the OpenVINO device instead (default "CPU").
    backend: "auto" (the runtime measured faster for the precision, FASTER_BACKEND, when installed), "onnxruntime"
        or "openvino" (they read the same file; docs/deployment.md says which is faster where).
    precision: "fp32" computes as the file is (fp32, or INT8 layers + fp32); "bf16" computes the image encoder's
        non-INT8 operations in bf16 and the heads in fp32 (OpenVINO only; fast on CPUs with AVX512-BF16 or AMX);
        "auto": "bf16" (an INT8 file: "int8+bf16") where OpenVINO runs the file on a CPU with native bf16, else as
        the file.
        `engine.precision` and `engine.precision_reason` say what was chosen and why.
    """
    return OnnxEngine(path, providers=providers, backend=backend, precision=precision)


def _choose_backend(backend: str, precision: str) -> str:
    if backend != "auto":
        return backend
    preferred = FASTER_BACKEND["bf16" if precision == "bf16" else "fp32"]
    if preferred == "openvino" and importlib.util.find_spec("openvino") is None:
        return "onnxruntime"
    return preferred


def read_metadata(metadata: dict[str, str], path: Path) -> tuple[ModelIdentity, ModelConfig]:
    """(identity, config) from an exported file's metadata; ValueError naming the file when they are missing."""
    if metadata.get(META_FORMAT) != FORMAT or META_IDENTITY not in metadata:
        raise ValueError(
            f"{path} is not a vip2clip ONNX export (metadata {META_FORMAT!r} = {FORMAT!r} missing); "
            "export one with `vip2clip export` or vip2clip.export_onnx"
        )
    try:
        identity = ModelIdentity.from_dict(json.loads(metadata[META_IDENTITY]))
        config = ModelConfig.from_dict(identity.config or {})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: unreadable model identity in its metadata (written by vip2clip "
            f"{metadata.get(META_VERSION, '?')}): {error}"
        ) from error
    return identity, config


@dataclass(kw_only=True)
class Opened:
    """A model opened by a runtime: its runner and metadata, where it runs, and in which precision and why."""

    run: Runner
    metadata: dict[str, str]
    providers: tuple[str, ...]
    available: tuple[str, ...]
    precision: str  # "fp32" | "bf16" | "int8" | "int8+bf16"
    reason: str
    parts: ExactHeads | None = None


def choose_precision(requested: str, backend: str, *, file_precision: str, device: str = "CPU") -> tuple[str, str]:
    """(what computes: "fp32" | "bf16" | "int8" | "int8+bf16", one line on why) for a `load_onnx` precision.

    "bf16" means the image encoder in bf16 and the heads in fp32 (OpenVINO; `openvino_precision`). auto picks it
    only where it is fast, OpenVINO's CPU plugin on a CPU with native bf16 (`auto_precision`), and fp32 elsewhere.
    An INT8 file keeps its INT8 layers; under auto the rest of its image encoder runs in bf16 in the same place
    (measured 1.27x faster than INT8 + fp32 on ViT-L/14 at 518 px, with the same metrics on the demo's trained
    model: docs/precision.md), elsewhere in fp32 as the file says."""
    as_file = AS_FILE.get(file_precision, "fp32")
    if requested == "fp32":
        return file_precision, f"fp32 as asked ({as_file})"
    if requested == "bf16":
        features = cpu_features()
        slow = f" ({features.describe_bf16()})" if device == "CPU" and features.known and not features.bf16 else ""
        return ("int8+bf16" if file_precision == "int8" else "bf16"), f"bf16 as asked{slow}"
    if backend == "onnxruntime":
        return file_precision, f"auto: {as_file} (ONNX Runtime has no bf16 CPU kernels)"
    if device != "CPU":
        return file_precision, f"auto: {as_file} (OpenVINO device {device}: no precision hint, the device's default)"
    choice, why = auto_precision("cpu", cpu_features())
    if choice != "bf16":
        return file_precision, why if file_precision == "fp32" else f"{why}: {as_file}"
    if file_precision == "int8":
        return "int8+bf16", f"{why}: INT8 layers, the rest of the image encoder bf16, fp32 heads on OpenVINO"
    return "bf16", f"{why}: bf16 image encoder, fp32 heads on OpenVINO"


def _onnxruntime(path: Path, providers: Sequence[str] | None, precision: str) -> Opened:
    ort = import_optional("onnxruntime", "the ONNX engine")
    try:
        session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as error:  # onnxruntime's own exception classes derive from Exception only
        raise OnnxLoadError(load_problem(path, error)) from None

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, anomaly_map = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return score, anomaly_map

    metadata = dict(session.get_modelmeta().custom_metadata_map)
    computes, reason = choose_precision(precision, "onnxruntime", file_precision=metadata.get(META_PRECISION, "fp32"))
    used, available = tuple(session.get_providers()), tuple(ort.get_available_providers())
    return Opened(run=run, metadata=metadata, providers=used, available=available, precision=computes, reason=reason)


@functools.cache
def openvino_core(ov: ModuleType) -> Any:
    """The process's one OpenVINO Core, never destroyed. Each Core's CPU plugin gives the calling thread a signal
    stack of its own (sigaltstack) and, when the Core is destroyed, puts back the one it found: two Cores destroyed
    in the order they were made leave the thread on an unmapped stack, and the next Python signal handler (CPython
    runs them on that stack: Ctrl+C, the SIGCHLD handler of torch's DataLoader) kills the process with SIGSEGV
    (OpenVINO 2026.4; tests/onnx_models/test_onnx.py reproduces it). One Core never hands back a freed stack."""
    return ov.Core()


def _openvino(path: Path, providers: Sequence[str] | None, precision: str) -> Opened:
    ov = import_optional("openvino", "the OpenVINO backend", extra="openvino")
    core = openvino_core(ov)
    try:
        model = core.read_model(str(path))
    except Exception as error:  # OpenVINO raises RuntimeError (and its own classes) with C++ context
        raise OnnxLoadError(load_problem(path, error)) from None
    # OpenVINO keeps an ONNX file's metadata_props under rt_info["framework"].
    keys = (META_FORMAT, META_IDENTITY, META_VERSION, META_PRECISION, META_QUANTIZATION)
    metadata = {key: model.get_rt_info(["framework", key]).astype(str) for key in keys if _has_rt(model, key)}
    read_metadata(metadata, path)  # not a vip2clip export: say so before compiling it
    device = providers[0] if providers else "CPU"
    file_precision = metadata.get(META_PRECISION, "fp32")
    computes, reason = choose_precision(precision, "openvino", file_precision=file_precision, device=device)
    opened = functools.partial(Opened, metadata=metadata, providers=(device,), available=tuple(core.available_devices))
    bf16 = computes in ("bf16", "int8+bf16") and device == "CPU"
    split = split_encoder(model) if bf16 else None
    if bf16 and split is None:
        computes, reason = _unsplittable(precision, computes, reason, file_precision)
        bf16 = computes != file_precision
    try:
        if split is not None:
            parts = ExactHeads(core, split, device=device)
            computes, reason = _as_compiled(parts.encoder, computes, reason, file_precision)
            return opened(run=parts, precision=computes, reason=reason, parts=parts)
        # f32 like ONNX Runtime and torch unless bf16 is chosen: on CPUs with bf16 units the plugin would otherwise
        # compute in bf16. INT8 (QDQ) layers run in INT8 either way.
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"} if device == "CPU" else {}
        compiled = core.compile_model(model, device, hint)
        if bf16:
            computes, reason = _as_compiled(compiled, computes, reason, file_precision)
    except Exception as error:  # e.g. a device this machine does not have
        raise OnnxLoadError(
            f"{load_problem(path, error)} (OpenVINO device {device}; it offers {', '.join(core.available_devices)})"
        ) from None
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in OUTPUT_NAMES]

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({INPUT_NAME: images})
        score, anomaly_map = (np.array(result[output], dtype=np.float32) for output in outputs)  # copies
        return score, anomaly_map

    return opened(run=run, precision=computes, reason=reason)


def _as_compiled(compiled: Any, computes: str, reason: str, file_precision: str) -> tuple[str, str]:
    """(precision, reason) as the compiled model really computes: OpenVINO's CPU plugin ignores a bf16 hint on a
    CPU without native bf16 and computes in fp32 there, which the log and the metadata must say, not "bf16"."""
    if runtime_precisions(compiled)["bf16"]:
        return computes, reason
    as_file = AS_FILE.get(file_precision, "fp32")
    why = f"{reason}, but OpenVINO computes in fp32 on this CPU (its CPU plugin has no bf16 here): {as_file}"
    logger.warning("ONNX engine: %s", why)
    return file_precision, why


def _unsplittable(requested: str, computes: str, reason: str, file_precision: str) -> tuple[str, str]:
    """(precision, reason) when the file's image encoder was not recognised, so the heads cannot be kept apart:
    auto runs the file as it is; bf16 asked for runs everywhere in bf16, with a warning."""
    if requested == "auto":
        return file_precision, f"{reason}; but the file's image encoder was not recognised: as the file"
    logger.warning(_ALL_BF16_WARNING)
    return computes, f"{reason}; bf16 everywhere (the file's image encoder was not recognised)"


def _has_rt(model: Any, key: str) -> bool:
    return bool(model.has_rt_info(["framework", key]))
