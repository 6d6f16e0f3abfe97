"""Atomic writes: a half-written index or image must never be left where a reader expects a whole one.

Each writer fills a temporary file in the destination folder (same file system, so `os.replace` is an atomic
rename) and only then moves it into place. The temporary file is created with mode 0o666 minus the user's umask,
like any `open(path, "w")`, so the results keep the permissions the user expects (`tempfile.mkstemp` would make
every result private, 0o600). A failed write (a full disk) removes the temporary file and leaves the previous
version of the destination as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, unique temporary file beside `path`: (descriptor, name). Mode 0o666 & ~umask (the kernel applies
    the umask, as for any new file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp_name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temp_name, flags, 0o666), temp_name
        except FileExistsError:  # astronomically rare: draw another name
            continue


def give_default_mode(path: str | Path) -> None:
    """Give `path` the mode a new file (0o666) or folder (0o777) gets under the user's umask: for what a library
    creates owner-only (mkdtemp's folders, onnx's external-data files are 0o600) and becomes a result."""
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    Path(path).chmod((0o777 if Path(path).is_dir() else 0o666) & ~umask)


def _write_error(path: Path, cause: OSError) -> OSError:
    """An OSError naming the destination and the system's reason (no "[Errno 28]" prefix), same errno."""
    kept = " (the earlier file is unchanged)" if path.is_file() else ""
    failure = OSError(f"cannot write {path}: {cause.strerror or cause}{kept}")
    failure.errno = cause.errno or errno.EIO
    return failure


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str, durable: bool, check: Callable[[Path], None] | None = None) -> Iterator[IO]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = _create_temp(path)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            yield stream
            if durable:  # an index or a checkpoint is worth a sync; thousands of derived crops are not
                stream.flush()
                os.fsync(stream.fileno())
        if check is not None:  # e.g. a download's hash: a file that fails it never takes the destination's name
            check(Path(temp_name))
        os.replace(temp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        if isinstance(error, OSError) and error.strerror:  # a system error (full disk ...), not PIL's own OSErrors
            raise _write_error(path, error) from error
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    with _atomic_file(path, "w", durable=True) as stream:
        stream.write(text)
    return path


def atomic_copy_stream(
    source: IO[bytes], path: str | Path, *, check: Callable[[Path], None] | None = None, chunk: int = 1 << 20
) -> Path:
    """Copy a readable binary stream (a file, an HTTP response) to `path` atomically; `check(temp_path)` runs on
    the complete copy before it takes the destination's name (raise to refuse it: nothing is left behind)."""
    path = Path(path)
    with _atomic_file(path, "wb", durable=True, check=check) as stream:
        for block in iter(lambda: source.read(chunk), b""):
            stream.write(block)
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


def json_line(data: Any) -> str:
    """`data` as one line of strict JSON (NaN and inf become null), for journals and logs (JSON Lines)."""
    return json.dumps(json_safe(data), allow_nan=False)


def atomic_save_image(image: Image.Image, path: str | Path, *, image_format: str | None = None) -> Path:
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
    try:
        with _atomic_file(path, "wb", durable=True) as stream:
            torch.save(obj, stream)
    except RuntimeError as error:
        # torch's zip writer reports a failed write (ENOSPC, EFBIG) as "[enforce fail ...] unexpected pos"; the
        # OSError behind it is the message the user can act on.
        if not isinstance(error.__context__, OSError):
            raise
        raise _write_error(path, error.__context__) from error
    return path


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6 (and the release's .pth files)
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format: a pickle (protocol 2+)
_OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"{", "JSON"), (b"[", "JSON"))


def _not_a_torch_file(head: bytes) -> str | None:
    """Why the first bytes of a file rule out a torch.save file, or None when they might be one."""
    if head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        return None
    if not head:
        return "it is empty"
    what = next((name for magic, name in _OTHER_FORMATS if head.lstrip().startswith(magic)), None)
    if what is None:
        what = "text" if head.isascii() and head.decode("ascii").isprintable() else "unknown binary data"
    return f"it holds {what}"


def read_torch_file(path: str | Path, what: str, *, error_type: type[Exception] = ValueError) -> Any:
    """torch.load on the CPU, tensors and plain data only. Every failure is an `error_type` naming the file and
    what is wrong with it in words (empty, JSON, an image, truncated, arbitrary pickled objects, TorchScript),
    never torch's own text (miniz errors, "[Errno 22]", advice to turn off weights_only)."""
    import torch

    path = Path(path)
    try:
        with path.open("rb") as stream:
            head = stream.read(16)
    except OSError as error:
        raise error_type(f"cannot read {what} {path}: {error.strerror or error}") from error
    problem = _not_a_torch_file(head)
    if problem is not None:
        raise error_type(f"{path} is not a {what} file ({problem}); expected a .pt/.pth file written by torch.save")
    try:
        with warnings.catch_warnings():  # torch warns about zip files it takes for TorchScript: we say it below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "TorchScript" in text:
            why = "it is a TorchScript archive (OpenAI's CLIP weights are one: pass those with --clip-weights)"
        elif "Weights only load failed" in text and head.startswith(_ZIP_MAGIC):
            why = "it holds Python objects other than tensors and plain data (a pickled model?), not loaded for safety"
        else:
            why = "it is truncated or damaged (copy it again)"
        raise error_type(f"{path} is not a readable {what} file: {why}") from error
