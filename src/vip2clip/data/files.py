"""Finding the images a user points at: files and folders (searched recursively) -> unique input images.

Each image gets a key, its path below the folder given (the folder's own name included, POSIX), which names its
outputs. Hidden entries and an excluded folder (the run's own output folder) are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class InputImage:
    """path: absolute; key: relative name for its outputs (POSIX, e.g. "good/a.png")."""

    path: Path
    key: str


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Image files below `root`, sorted, skipping hidden entries and the excluded folder."""
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or here / d != exclude))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield here / name


def find_images(paths: Sequence[str | Path], exclude: str | Path | None = None) -> list[InputImage]:
    """Files and folders (searched recursively for png jpg jpeg bmp tif tiff webp) -> unique input images.

    A file named explicitly is taken whatever its suffix. Raises FileNotFoundError for a missing path.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, str] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"no such file or folder: {root}")
        root = root.resolve()
        if root.is_dir():
            for path in _walk(root, exclude):
                found.setdefault(path, (Path(root.name or "root") / path.relative_to(root)).as_posix())
        else:
            found.setdefault(root, root.name)
    return [InputImage(path, key) for path, key in found.items()]


def no_images_error(paths: Sequence[str | Path]) -> ValueError:
    """The error for inputs that hold no image."""
    return ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
