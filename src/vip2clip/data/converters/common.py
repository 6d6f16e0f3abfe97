"""Machinery shared by the converters: listing folders fast, pairing masks by name, collecting warnings.

No converter decodes an image (KSDD's raw form aside, which must cut crops): listing uses `os.scandir`, so a
10,000-image tree converts in well under a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vip2clip.data.index import DatasetIndex, Sample, build_index

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ConvertOptions:
    """`seed` drives KSDD's train/test split of normal crops; `strict` is applied by `convert_dataset`."""

    strict: bool = False
    seed: int = 0


@dataclass(kw_only=True)
class Conversion:
    """What a converter found: samples of both splits, plus warnings (problems) and notes (information)."""

    root: Path
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def warn(self, path: Path | str, problem: str) -> None:
        self.warnings.append(f"{path}: {problem}")

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def add(
        self, split: str, image: Path, *, mask: Path | None, cls_name: str, specie_name: str, anomaly: bool
    ) -> None:
        sample = Sample(
            img_path=self.relative(image),
            mask_path=self.relative(mask) if mask is not None and anomaly else "",
            cls_name=cls_name,
            specie_name=specie_name,
            anomaly=int(anomaly),
        )
        (self.train if split == "train" else self.test).append(sample)

    def index(self) -> DatasetIndex:
        return build_index(self.root, {"train": self.train, "test": self.test})


def natural_key(name: str) -> tuple:
    """Sort key that orders `2.png` before `10.png` (and is total for mixed names)."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part.lower()) for part in _DIGITS.split(name))


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (any case of suffix; hidden files skipped), in natural order."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = [
            entry.name
            for entry in entries
            if entry.is_file() and not entry.name.startswith(".") and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return [folder / name for name in sorted(names, key=natural_key)]


def list_dirs(folder: Path) -> list[Path]:
    """Sub-folders of `folder` (hidden ones and macOS `__MACOSX` skipped), in natural order."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith((".", "__MACOSX"))]
    return [folder / name for name in sorted(names, key=natural_key)]


def find_child(folder: Path, name: str) -> Path | None:
    """`folder/name`, matched case-insensitively (downloads differ in `Test` vs `test`), or None."""
    exact = folder / name
    if exact.exists():
        return exact
    for child in list_dirs(folder):
        if child.name.lower() == name.lower():
            return child
    return None


def locate(root: Path, marker: str, *, depth: int = 2) -> Path | None:
    """The first folder at most `depth` levels below `root` (root itself first) that holds `marker`."""
    frontier = [root]
    for _ in range(depth + 1):
        for folder in frontier:
            if (folder / marker).exists():
                return folder
        frontier = [child for folder in frontier for child in list_dirs(folder)]
    return None


def pair_masks(
    images: Sequence[Path], mask_dir: Path | None, *, suffixes: Sequence[str], conversion: Conversion
) -> dict[Path, Path | None]:
    """Pair each image with the mask named `STEM + suffix + any image extension` in `mask_dir`, by name.

    Never by position: an image without a mask maps to None and is reported, and so is a mask that matches no
    image, so one missing file cannot shift the pairs after it. The first suffix that matches wins.
    """
    masks = list_images(mask_dir) if mask_dir is not None else []
    by_name = {(path.stem.lower()): path for path in masks}
    pairs: dict[Path, Path | None] = {}
    used: dict[Path, Path] = {}  # mask -> the first image it was paired with
    for image in images:
        found = next((by_name[key] for key in (f"{image.stem}{s}".lower() for s in suffixes) if key in by_name), None)
        if found is None:
            where = mask_dir if mask_dir is not None else "(no mask folder)"
            conversion.warn(image, f"anomalous image without its mask (looked in {where})")
        elif found in used:  # 000.png and 000.jpg: one mask cannot tell which image it belongs to
            conversion.warn(image, f"shares its mask {found.name} with {used[found].name} (same name, other suffix)")
        else:
            used[found] = image
        pairs[image] = found
    for mask in masks:
        if mask not in used:
            conversion.warn(mask, "mask without an image")
    return pairs


def warn_unknown_dirs(folder: Path, known: Iterable[str], *, conversion: Conversion, what: str) -> None:
    """Report sub-folders of `folder` that the layout does not explain (compared case-insensitively)."""
    known_lower = {name.lower() for name in known}
    for child in list_dirs(folder):
        if child.name.lower() not in known_lower:
            conversion.warn(child, f"unexpected {what}; ignored")


def warn_nested_dirs(folders: Iterable[Path], conversion: Conversion) -> None:
    """Report sub-folders of image folders (normal or defect folders): their images are not indexed."""
    for folder in folders:
        warn_unknown_dirs(
            folder, (), conversion=conversion, what="sub-folder in an image folder (its images are not indexed)"
        )


def single_wrapper(root: Path) -> Path | None:
    """The one folder inside `root` when root holds nothing else of interest (no other folder, no image), as an
    archive unpacks (DAGM_KaggleUpload/, mvtec_anomaly_detection/); else None."""
    children = list_dirs(root)
    return children[0] if len(children) == 1 and not list_images(root) else None
