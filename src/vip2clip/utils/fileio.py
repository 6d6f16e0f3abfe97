"""Atomic writes: a half-written index or image must never be left where a reader expects a whole one.

Each writer fills a temporary file in the destination folder (same file system, so `os.replace` is an atomic
rename) and only then moves it into place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str, durable: bool) -> Iterator[IO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as stream:
            yield stream
            if durable:  # an index or a checkpoint is worth a sync; thousands of derived crops are not
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    with _atomic_file(path, "w", durable=True) as stream:
        stream.write(text)
    return path


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (strict JSON has no NaN), paths -> str, tuples -> lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as strict JSON (indent 2; NaN and inf become null, see `json_safe`) atomically."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def atomic_save_image(image: Image.Image, path: str | Path, image_format: str | None = None) -> Path:
    """Save a PIL image atomically; the format follows the suffix unless `image_format` is given."""
    path = Path(path)
    image_format = image_format or Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: cannot tell the image format from the suffix {path.suffix!r}")
    with _atomic_file(path, "wb", durable=False) as stream:
        image.save(stream, format=image_format)
    return path


def atomic_save_npy(array: np.ndarray, path: str | Path) -> Path:
    """np.save an array (.npy, no pickle) atomically; returns the path."""
    path = Path(path)
    with _atomic_file(path, "wb", durable=False) as stream:
        np.save(stream, np.asarray(array), allow_pickle=False)
    return path


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """torch.save atomically and durably (checkpoints, optimizer states)."""
    import torch  # imported here: the dataset tools that use this module do not need torch

    path = Path(path)
    with _atomic_file(path, "wb", durable=True) as stream:
        torch.save(obj, stream)
    return path
