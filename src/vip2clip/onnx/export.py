"""`export_onnx`: the whole predict of a ViP²-CLIP model as one ONNX graph, for `vip2clip.load_onnx`.

One graph from the normalised image batch [B, 3, S, S] (B dynamic, S fixed at export) to pred_score [B] and
anomaly_map [B, S, S]: the image encoder (SDPA attention), VCA's per-image prompts and text encoder on the
truncated length, FGP, the top-K score and the matrix-product upsampling + Gaussian, the same code as
`ViP2CLIP.predict`. Exported with torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which needs
onnxscript): the legacy TorchScript exporter cannot translate open_clip's attention. The model's identity goes
into the file's metadata, so calibrations made with the torch model fit the ONNX one and vice versa.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from vip2clip import __version__
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.onnx.engine import (
    FORMAT,
    INPUT_NAME,
    META_FORMAT,
    META_IDENTITY,
    META_PRECISION,
    META_QUANTIZATION,
    META_VERSION,
    OUTPUT_NAMES,
    MissingDependencyError,
    import_optional,
)
from vip2clip.utils.cpu_features import cpu_features
from vip2clip.utils.fileio import give_default_mode

logger = logging.getLogger(__name__)

# Weights above this size go to a side file (`<name>.data`, ONNX external data). Protobuf caps a file at 2 GB and
# fp32 ViT-L/14's two towers are 1.7 GB: a single file would work but sits at the limit, and serialising it
# takes another 1.7 GB of memory. ViT-B/16 and smaller stay single files.
EXTERNAL_DATA_BYTES = 1 << 30
EXPORT_BATCH = 2  # the traced example batch: torch.export specialises a dimension of size 1, so not 1


class _PredictGraph(nn.Module):
    """images [B, 3, S, S] -> (pred_score [B], anomaly_map [B, S, S]): `ViP2CLIP.predict` as a traceable forward."""

    def __init__(self, model: ViP2CLIP, size: int) -> None:
        super().__init__()
        self.model, self.size = model, size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.model.prediction_from_output(self.model(images), (self.size, self.size))
        return prediction.pred_score, prediction.anomaly_map


def export_onnx(
    model: ViP2CLIP,
    path: str | Path,
    *,
    image_size: int | None = None,
    checkpoint: str | Path | None = None,
    external_data: bool | None = None,
    quantize: str | None = None,
    calibration_images: str | Path | Sequence[str | Path] | None = None,
    int8_method: str = "nncf",
    max_map_drop: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export `model`'s predict to the ONNX file `path` (written atomically).

    Returns: the path written. Raises: MissingDependencyError (onnx/onnxscript, or for INT8 nncf/onnxruntime, not
    installed); OSError when the destination cannot be written (both said before the slow export).

    Example:
        >>> import vip2clip
        >>> model = vip2clip.create_model("tiny", image_size=64, seed=0)
        >>> vip2clip.export_onnx(model, "model.onnx")  # doctest: +SKIP
        PosixPath('model.onnx')

    Args:
    image_size: the input side S (default the model's). checkpoint: the file the model's trainable weights came
        from, hashed into the recorded identity (as `ModelIdentity.of(model, checkpoint)`).
    external_data: weights in `<path>.data` beside the file; None decides by size (above EXTERNAL_DATA_BYTES).
    quantize: None (fp32) or "int8": the image encoder's linear layers post-training quantized
        (`vip2clip.onnx.quantize`), calibrated on `calibration_images` (files or folders of normal
        images) with `int8_method` ("nncf" or "onnxruntime"); `max_map_drop` (e.g. 0.01) keeps the encoder blocks
        that move the map most in fp32 until the map's rank correlation with fp32 is at least 1 - max_map_drop.
    progress: called with a line per step of the INT8 export.
    Runs in fp32 whatever the model's precision (the runtime chooses its own). Takes about a minute and a few GB
    of memory for ViT-L/14; INT8 a few minutes more and under 10 GB (benchmarks/RESULTS.md, issue 26).
    """
    import_optional("onnxscript", "ONNX export")
    import_optional("onnx", "ONNX export")
    path = Path(path)
    folder = staging_folder(path)  # before the slow part: a destination that cannot be written is said at once
    size = int(image_size or model.config.image_size)
    try:
        calibration = _calibration(quantize, calibration_images, size, int8_method)  # bad input: said at once
        program = _program(model, _identity(model, checkpoint, size), size)
        if calibration is None:
            if external_data is None:
                weights = sum(value.const_value.nbytes for value in program.model.graph.initializers.values())
                external_data = weights > EXTERNAL_DATA_BYTES
            save_program(program, path, external_data=external_data, folder=folder)
        else:
            fp32 = folder / "fp32" / "fp32.onnx"  # the quantizers read the graph from a file
            fp32.parent.mkdir()
            program.save(fp32, external_data=True)
            del program
            settings = _Int8Settings(int8_method, max_map_drop, progress)
            _write_int8(fp32, calibration, path=path, external_data=external_data, folder=folder, settings=settings)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _program(model: ViP2CLIP, identity: ModelIdentity, size: int) -> torch.onnx.ONNXProgram:
    """The traced graph of `model`'s predict at input size `size`, with `identity` in its metadata."""
    device = next(model.parameters()).device
    sample = torch.randn(EXPORT_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with _fp32_eval(model):
        # One real run first: the positional grid and the smoothing matrices are cached on the first call, and the
        # trace must find them there (computed under tracing they would become graph operations).
        model.predict(sample)
        program = torch.onnx.export(
            _PredictGraph(model, size).eval(),
            (sample,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    program.model.metadata_props.update(
        {META_FORMAT: FORMAT, META_IDENTITY: json.dumps(identity.to_dict()), META_VERSION: __version__}
    )
    return program


def quantize_onnx(
    source: str | Path,
    path: str | Path,
    *,
    calibration_images: str | Path | Sequence[str | Path],
    int8_method: str = "nncf",
    max_map_drop: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """An fp32 file written by `export_onnx` -> its INT8 version at `path` (as `export_onnx(..., quantize="int8")`
    without exporting again, and without a torch model in memory)."""
    onnx = import_optional("onnx", "INT8 export")
    source, path = Path(source), Path(path)
    metadata = {entry.key: entry.value for entry in onnx.load(source, load_external_data=False).metadata_props}
    if metadata.get(META_FORMAT) != FORMAT or metadata.get(META_PRECISION, "fp32") != "fp32":
        raise ValueError(f"{source} is not an fp32 vip2clip export (write one with `vip2clip export`)")
    identity = ModelIdentity.from_dict(json.loads(metadata[META_IDENTITY]))
    calibration = _calibration("int8", calibration_images, int(identity.image_size), int8_method)
    folder = staging_folder(path)
    try:
        settings = _Int8Settings(int8_method, max_map_drop, progress)
        _write_int8(source, calibration, path=path, external_data=None, folder=folder, settings=settings)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


@dataclasses.dataclass(frozen=True)
class _Int8Settings:
    """How `_write_int8` quantizes (`quantize_int8`'s options): method, accuracy goal, where steps are reported."""

    method: str
    max_map_drop: float | None
    progress: Callable[[str], None] | None


def _write_int8(
    fp32: Path, calibration, *, path: Path, external_data: bool | None, folder: Path, settings: _Int8Settings
) -> None:
    """Quantize the fp32 file `fp32` and write it to `path` (through `folder`) with its metadata plus how."""
    from vip2clip.onnx.quantize import quantize_int8

    onnx = import_optional("onnx", "INT8 export")
    metadata = {entry.key: entry.value for entry in onnx.load(fp32, load_external_data=False).metadata_props}
    quantized, report = quantize_int8(
        fp32, calibration, method=settings.method, max_map_drop=settings.max_map_drop, progress=settings.progress
    )
    metadata |= {META_PRECISION: "int8", META_QUANTIZATION: json.dumps(report.to_dict())}
    del quantized.metadata_props[:]
    for key, value in metadata.items():
        quantized.metadata_props.add(key=key, value=value)
    if external_data is None:
        external_data = quantized.ByteSize() > EXTERNAL_DATA_BYTES

    def write(target: Path, external: bool) -> None:
        onnx.save(quantized, target, save_as_external_data=external, location=target.name + ".data")

    save_written(write, path, external_data=external_data, folder=folder)


def _calibration(
    quantize: str | None, images: str | Path | Sequence[str | Path] | None, size: int, method: str = "nncf"
):
    """The calibration images of an INT8 export with `method`, and its packages, checked before the minutes of
    export; None for fp32."""
    if quantize is None:
        return None
    if quantize != "int8":
        raise ValueError(f"unknown quantization {quantize!r}; the only one is 'int8'")
    if images is None:
        raise ValueError("an INT8 export needs calibration_images: a folder (or files) of normal images")
    from vip2clip.onnx.calibration_images import load_calibration_images

    check_int8_dependencies(method)  # a missing quantizer is said before the minutes of export, not after
    features = cpu_features()
    if features.known and not features.int8:
        logger.warning(
            "exporting INT8 on a CPU without VNNI (%s): the export works, but INT8 models run slowly on such "
            "CPUs; deploy it on one with VNNI or AMX",
            features.model,
        )
    paths = [images] if isinstance(images, (str, Path)) else list(images)
    return load_calibration_images(paths, size)


def check_int8_dependencies(method: str) -> None:
    """ValueError for an unknown `method`; MissingDependencyError naming what to install, and the method that
    works without it, when a package `method` needs is missing."""
    from vip2clip.onnx.quantize import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown INT8 method {method!r}; choose one of {list(METHODS)}")
    for name in ("onnx", "onnxruntime"):  # NNCF's ONNX backend calibrates on ONNX Runtime too
        import_optional(name, f"INT8 export ({method})")
    if method == "onnxruntime":
        from onnxruntime import __version__
        from onnxruntime.quantization import quantize_static

        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            raise MissingDependencyError(
                f"--int8-method onnxruntime needs an onnxruntime whose quantize_static takes calibration ranges "
                f"(calibration_cache_path; this one is {__version__}): pip install -U onnxruntime, or use "
                "--int8-method nncf"
            )
    if method == "nncf":
        try:
            import_optional("nncf", "INT8 export with NNCF (--int8-method nncf, the default)", extra="int8")
        except MissingDependencyError as error:
            raise MissingDependencyError(
                f"{error}, or use --int8-method onnxruntime (int8_method='onnxruntime'), which needs only the "
                "onnx extra"
            ) from error


def _identity(model: ViP2CLIP, checkpoint: str | Path | None, size: int) -> ModelIdentity:
    identity = ModelIdentity.of(model, checkpoint)
    config = {**(identity.config or {}), "image_size": size}
    return dataclasses.replace(identity, image_size=size, config=config)


@contextlib.contextmanager
def _fp32_eval(model: ViP2CLIP):
    precision, training = model.precision, model.training
    model.set_precision("fp32").eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.set_precision(precision).train(training)


def staging_folder(path: Path) -> Path:
    """A new temporary folder beside `path` for the export to be written in; OSError naming `path` (not the
    temporary name) when `path` is a folder or its folder cannot be written."""
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, "is a folder; --out is the .onnx file to write (e.g. FOLDER/model.onnx)", str(path)
        )
    existing = next(folder for folder in (path.parent, *path.parent.parents) if folder.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write the ONNX export there ({existing} is a file)", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as error:
        raise OSError(
            error.errno, f"cannot write the ONNX export there ({error.strerror or error})", str(path)
        ) from None


def save_program(program: torch.onnx.ONNXProgram, path: Path, *, external_data: bool, folder: Path) -> None:
    """`save_written` of a traced program."""

    def write(target: Path, external: bool) -> None:
        program.save(target, external_data=external)

    save_written(write, path, external_data=external_data, folder=folder)


def save_written(write: Callable[[Path, bool], None], path: Path, *, external_data: bool, folder: Path) -> None:
    """Write the file (and `<name>.data`) with `write(target, external_data)` in `folder` (`staging_folder`), then
    move them into place: a reader never finds half a model, and a stale side file of an earlier export is removed.
    A failed write (full disk, file size limit) is an OSError naming `path` and the free space, and leaves the
    earlier files as they were."""
    data = path.with_name(path.name + ".data")
    try:
        write(folder / path.name, external_data)
        if (folder / data.name).exists():
            give_default_mode(folder / data.name)  # onnx.save writes it 0o600; the .onnx beside it is 0o644
            os.replace(folder / data.name, data)
        else:
            data.unlink(missing_ok=True)
        os.replace(folder / path.name, path)
    except (OSError, RuntimeError, ValueError) as error:  # onnx's serialiser raises RuntimeError, without a path
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
        code = getattr(error, "errno", None) or errno.EIO
        raise OSError(code, f"cannot write the ONNX export ({reason}; {free})", str(path)) from None
