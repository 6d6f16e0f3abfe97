"""The one hasher: files (checkpoints, calibration records, cache keys) and the JSON keys that name cache entries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks. FileNotFoundError names a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_digest(data: Any, length: int = 64) -> str:
    """The first `length` hex digits of the SHA-256 of `data` as canonical JSON (sorted keys): names a cache entry
    after everything it depends on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def git_blob_sha1(path: str | Path) -> str:
    """The id git gives a file's content (SHA-1 of "blob SIZE\\0" + bytes): how a repository publishes the hash
    of each file it holds, so a download from it can be checked without a separately published SHA-256."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
