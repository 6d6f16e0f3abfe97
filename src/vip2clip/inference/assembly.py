"""The one path from "which model, with which settings" to a ready model or `Predictor`.

A `ModelSpec` says where the model comes from: a PyTorch model built by `vip2clip.create_model` (checkpoint, CLIP
weights, backbone or preset, input size, device, precision, compile, `ModelConfig` overrides) or a file exported by
`vip2clip export` (ONNX, run on ONNX Runtime or OpenVINO). A `PredictorSpec` adds what the predictor does with it:
tiling, reference images (and their cache), decision thresholds (calibration file, explicit values) and batch size.
Both are small frozen records, so the command line, the server, the Python API (`Predictor.from_checkpoint`,
`Predictor.from_onnx`, `Predictor.from_spec`) and integrations fill in the same fields and get the same model.

`build_model(spec)` reads a checkpoint once (its recorded backbone decides whether CLIP weights are needed, and the
same loaded checkpoint goes to `create_model`), and `load_engine(spec)` returns the engine and its identity for
either source. `checkpoint` and `clip_weights` accept whatever `create_model` accepts (files, downloaded published
tags, open_clip tags).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vip2clip.config import ModelConfig
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.weights_policy import check_weights_choice
from vip2clip.scoring.tiling import TileConfig

if TYPE_CHECKING:
    from vip2clip.factory import SharedBackbones
    from vip2clip.inference.calibration import Calibration
    from vip2clip.model.vip2clip import ViP2CLIP
    from vip2clip.scoring.mutual_rule import MutualRule
    from vip2clip.scoring.references import ReferenceMemory

logger = logging.getLogger(__name__)

# ModelConfig fields a spec may override (backbone and image size are the spec's own fields).
CONFIG_OVERRIDES = tuple(f.name for f in fields(ModelConfig) if f.name not in ("backbone", "image_size"))
# Fields an exported model has fixed: given together with `onnx`, they are refused, not ignored.
FIXED_BY_EXPORT = ("checkpoint", "clip_weights", "random_init", "backbone", "image_size", "compile")
ONNX_BACKENDS = ("auto", "onnxruntime", "openvino")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a model comes from.

    checkpoint: a vip2clip or release checkpoint (file or downloaded published tag); None: untrained heads.
    clip_weights: CLIP weights (file, published tag or open_clip tag); required unless random_init (the tiny test
        backbone excepted: `vip2clip.model.weights_policy`, the one rule of `create_model`).
    random_init: random CLIP weights on purpose (timing, tests: scores mean nothing).
    allow_other_weights: run a checkpoint on CLIP weights other than those it records having been trained with.
    backbone: a preset of `vip2clip.list_models()` or an open_clip name (default: the checkpoint's, else ViT-L-14-336).
    image_size, device, precision ("fp32", "fp16", "bf16", or "auto": bf16 where the device computes it natively,
    else fp32), compile (torch.compile the encoder blocks), seed (initialises untrained parts), config
    (`ModelConfig` overrides: top_k, sigma, ablation switches, ...).
    onnx / onnx_backend: an exported model instead ("auto", "onnxruntime" or "openvino"); only device and precision
    ("auto", "fp32" or "bf16": what the runtime computes in, `load_onnx`) go with it (the export fixed the rest).
    """

    checkpoint: str | Path | None = None
    clip_weights: str | Path | None = None
    random_init: bool = False
    backbone: str | None = None
    image_size: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    seed: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    onnx: str | Path | None = None
    onnx_backend: str = "auto"
    allow_other_weights: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.config) - set(CONFIG_OVERRIDES))
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; known: {', '.join(CONFIG_OVERRIDES)}")
        if self.onnx_backend not in ONNX_BACKENDS:
            raise ValueError(f"onnx_backend must be one of {ONNX_BACKENDS}, got {self.onnx_backend!r}")
        check_weights_choice(
            self.clip_weights, random_init=self.random_init
        )  # the backbone is known once a checkpoint is read

    def fixed_by_export(self) -> list[str]:
        """The fields given that an ONNX export fixed (precision counts when fp16; top_k and sigma among the config
        overrides); empty without `onnx`."""
        if self.onnx is None:
            return []
        given = [name for name in FIXED_BY_EXPORT if getattr(self, name)]
        given += [name for name in ("top_k", "sigma") if self.config.get(name) is not None]
        return given + (["precision"] if self.precision == "fp16" else [])


@dataclass(frozen=True, kw_only=True)
class PredictorSpec:
    """A model and what the predictor does with it.

    tiling: score large images tile by tile (None: whole images). reference: a folder of normal images of the part
    (few-shot; not with an ONNX model), their memory cached in reference_cache (None: the default cache folder).
    calibration / image_threshold / pixel_threshold: the decisions (`resolve_thresholds`); decide=False leaves the
    predictor's default thresholds (for `calibrate`, which derives them). batch_size: images per forward pass.
    mutual: the images of each `score` / `predict` call score each other (`MutualRule`; None: each image alone;
    not with an ONNX model, whose graph gives no patch tokens).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    tiling: TileConfig | None = None
    reference: str | Path | None = None
    reference_cache: str | Path | None = None
    calibration: str | Path | Calibration | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    decide: bool = True
    batch_size: int = 8
    mutual: MutualRule | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.mutual is not None and self.model.onnx is not None:
            raise ValueError("mutual scoring needs the encoder's patch tokens, which an ONNX export does not output")


def build_model(spec: ModelSpec, shared: SharedBackbones | None = None) -> tuple[ViP2CLIP, ModelIdentity]:
    """The PyTorch model of `spec` (not `onnx`) and its identity; the checkpoint is read once. shared: the frozen
    CLIP comes from it (`create_model`)."""
    from vip2clip.factory import create_model
    from vip2clip.model.checkpoint import load_checkpoint

    if spec.onnx is not None:
        raise ValueError(f"{spec.onnx}: an ONNX model is loaded by load_engine, not built")
    checkpoint = load_checkpoint(spec.checkpoint) if spec.checkpoint is not None else None
    model = create_model(
        backbone=spec.backbone,
        clip_weights=spec.clip_weights,
        checkpoint=checkpoint,
        image_size=spec.image_size,
        device=spec.device,
        seed=spec.seed,
        precision=spec.precision,
        random_init=spec.random_init,
        allow_other_weights=spec.allow_other_weights,
        shared=shared,
        **spec.config,
    )
    model = model.compile_encoders() if spec.compile else model
    return model, ModelIdentity.of(model, None if checkpoint is None else checkpoint.path)


def _onnx_providers(device: str, backend: str) -> list[Any] | None:
    """The runtime's device list for a torch-style device name: OpenVINO's CPU/GPU, ONNX Runtime's providers."""
    if backend == "openvino":
        return [device.upper()]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return None


def load_engine(spec: ModelSpec) -> tuple[Any, ModelIdentity]:
    """(engine, its identity): the PyTorch model (`build_model`) or the ONNX engine of `spec.onnx` (no torch)."""
    if spec.onnx is None:
        return build_model(spec)
    from vip2clip.onnx.engine import import_optional, load_onnx

    fixed = spec.fixed_by_export()
    if fixed:
        raise ValueError(f"an exported model runs as it is: {', '.join(fixed)} cannot be given with it")
    backend = spec.onnx_backend
    if backend == "auto" and spec.device.startswith("cuda"):
        backend = "onnxruntime"  # OpenVINO's devices are not CUDA devices
    cuda = spec.device.startswith("cuda") and backend == "onnxruntime"
    offered = import_optional("onnxruntime", "the ONNX engine").get_available_providers() if cuda else ()
    if cuda and "CUDAExecutionProvider" not in offered:
        raise _no_onnx_cuda(spec.device, offered)  # before loading: a large model takes a while
    engine = load_onnx(
        spec.onnx, providers=_onnx_providers(spec.device, backend), backend=backend, precision=spec.precision
    )
    if cuda and "CUDAExecutionProvider" not in engine.providers:
        raise _no_onnx_cuda(spec.device, engine.providers)
    logger.info("%s", engine.describe())
    return engine, engine.identity


def _no_onnx_cuda(device: str, offered: Sequence[str]) -> ValueError:
    """ONNX Runtime would fall back to the CPU with only a warning of its own: refused instead."""
    return ValueError(
        f"--device {device} with --onnx: ONNX Runtime cannot run on CUDA here (it offers {', '.join(offered)}; "
        "CUDA needs the onnxruntime-gpu package and a CUDA device). Drop --device to run on the CPU"
    )


def load_reference_memory(spec: PredictorSpec, *, engine: Any, identity: ModelIdentity) -> ReferenceMemory | None:
    """The memory of `spec.reference` (cached), None without it."""
    if spec.reference is None:
        return None
    from vip2clip.scoring.references import default_cache_dir, load_references  # imports torch

    cache = default_cache_dir() if spec.reference_cache is None else spec.reference_cache
    memory = load_references(
        engine, identity, folder=spec.reference, tiling=spec.tiling, batch_size=spec.batch_size, cache_dir=cache
    )
    logger.info("references: %d images of %s (%d patches)", len(memory.files), spec.reference, memory.n_patches)
    return memory
