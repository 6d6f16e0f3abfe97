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
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from vip2clip import __version__
from vip2clip.inference.onnx_engine import (
    FORMAT,
    INPUT_NAME,
    META_FORMAT,
    META_IDENTITY,
    META_VERSION,
    OUTPUT_NAMES,
    import_optional,
)
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP

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
    image_size: int | None = None,
    checkpoint: str | Path | None = None,
    external_data: bool | None = None,
) -> Path:
    """Export `model`'s predict to the ONNX file `path` (written atomically); returns the path.

    image_size: the input side S (default the model's). checkpoint: the file the model's trainable weights came
        from, hashed into the recorded identity (as `ModelIdentity.of(model, checkpoint)`).
    external_data: weights in `<path>.data` beside the file; None decides by size (above EXTERNAL_DATA_BYTES).
    Runs in fp32 whatever the model's precision (the runtime chooses its own). Takes about a minute and a few GB
    of memory for ViT-L/14.
    """
    import_optional("onnxscript", "ONNX export")
    import_optional("onnx", "ONNX export")
    path = Path(path)
    folder = staging_folder(path)  # before the slow part: a destination that cannot be written is said at once
    size = int(image_size or model.config.image_size)
    try:
        program = _program(model, _identity(model, checkpoint, size), size)
        if external_data is None:
            weights = sum(value.const_value.nbytes for value in program.model.graph.initializers.values())
            external_data = weights > EXTERNAL_DATA_BYTES
        save_program(program, path, external_data, folder)
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
        raise IsADirectoryError(errno.EISDIR, "is a folder; --out is the .onnx file to write (e.g. FOLDER/model.onnx)",
                                str(path))  # fmt: skip
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


def save_program(program: torch.onnx.ONNXProgram, path: Path, external_data: bool, folder: Path) -> None:
    """Write the file (and `<name>.data`) in `folder` (`staging_folder`), then move them into place: a reader never
    finds half a model, and a stale side file of an earlier export is removed. A failed write (full disk, file size
    limit) is an OSError naming `path` and the free space, and leaves the earlier files as they were."""
    data = path.with_name(path.name + ".data")
    try:
        program.save(folder / path.name, external_data=external_data)
        if (folder / data.name).exists():
            os.replace(folder / data.name, data)
        else:
            data.unlink(missing_ok=True)
        os.replace(folder / path.name, path)
    except (OSError, RuntimeError, ValueError) as error:  # onnx's serialiser raises RuntimeError, without a path
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
        code = getattr(error, "errno", None) or errno.EIO
        raise OSError(code, f"cannot write the ONNX export ({reason}; {free})", str(path)) from None
