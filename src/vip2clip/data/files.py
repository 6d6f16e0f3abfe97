"""Finding the images a user points at: files and folders (searched recursively) -> unique input images.

Each image gets a key, its path below the folder given (the folder's own name included, POSIX), which names its
outputs. Hidden entries and an excluded folder (the run's own output folder) are skipped silently. Everything else
that is not searched is reported in the `ImageScan`:
- masks: `ground_truth/` folders and files whose name ends in `_mask` (the `vip2clip convert folder` and MVTec
  layouts keep masks there; they are not parts to inspect), counted;
- folders that cannot be listed (no permission, I/O error), with the reason;
- symbolic links to folders are followed, each real folder once: a link back to a folder being searched (a loop)
  or to one already searched is listed instead of being searched again.
A file named explicitly is always taken, whatever its name or suffix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
MASK_FOLDER = "ground_truth"
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class InputImage:
    """path: absolute; key: relative name for its outputs (POSIX, e.g. "good/a.png")."""

    path: Path
    key: str


@dataclass
class ImageScan:
    """What `scan_images` found: the images, and what it did not search (see the module docstring).

    masks_skipped: image files under ground_truth/ folders or named *_mask; unreadable_folders: (folder, reason);
    links_not_followed: (link, reason) for folder links that loop or repeat a folder already searched.
    """

    images: list[InputImage] = field(default_factory=list)
    masks_skipped: int = 0
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)
    links_not_followed: list[tuple[str, str]] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per thing the user should know about the search (empty when it searched everything)."""
        lines = []
        if self.masks_skipped:
            lines.append(
                f"skipped {self.masks_skipped} mask file(s) ({MASK_FOLDER}/ folders and *{MASK_SUFFIX} files are "
                "masks, not parts; name a file explicitly to score it anyway)"
            )
        lines += [
            f"cannot list folder {path}: {reason}; its images are not included"
            for path, reason in self.unreadable_folders
        ]
        lines += [f"not following {path}: {reason}" for path, reason in self.links_not_followed]
        return lines

    def to_dict(self) -> dict:
        return {
            "masks_skipped": self.masks_skipped,
            "unreadable_folders": [{"path": path, "error": reason} for path, reason in self.unreadable_folders],
            "links_not_followed": [{"path": path, "reason": reason} for path, reason in self.links_not_followed],
        }


def is_mask_name(name: str) -> bool:
    """True for a file named like a mask (STEM_mask.ext, any case)."""
    return Path(name).stem.lower().endswith(MASK_SUFFIX)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk(root: Path, exclude: Path | None, scan: ImageScan) -> Iterator[Path]:
    """Image files below `root` in sorted order (files of a folder, then its sub-folders), recording in `scan`
    what is skipped. Each real folder is searched once (`seen`: real path -> the path it was searched as)."""
    seen: dict[Path, Path] = {}
    stack: list[tuple[Path, bool]] = [(root, False)]  # (folder, inside a ground_truth folder)
    while stack:
        folder, masks_only = stack.pop()
        real = folder.resolve()
        if real in seen:
            loop = seen[real] == folder or folder.is_relative_to(seen[real])
            why = f"it loops back to {seen[real]}" if loop else f"the same folder as {seen[real]}, already searched"
            scan.links_not_followed.append((str(folder), why))
            continue
        seen[real] = folder
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            scan.unreadable_folders.append((str(folder), error.strerror or str(error)))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            if _is_folder(entry):
                if exclude is None or path != exclude:
                    subfolders.append((path, masks_only or entry.name.lower() == MASK_FOLDER))
            elif _is_image_name(entry.name):
                if masks_only or is_mask_name(entry.name):
                    scan.masks_skipped += 1
                else:
                    yield path
        stack.extend(reversed(subfolders))


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links: a link to a folder is searched (once, see _walk)
    except OSError:
        return False


def scan_images(paths: Sequence[str | Path], exclude: str | Path | None = None) -> ImageScan:
    """Files and folders (searched recursively for png jpg jpeg bmp tif tiff webp) -> an `ImageScan` of unique
    input images and what was skipped. Raises FileNotFoundError for a missing path."""
    exclude = Path(exclude).resolve() if exclude is not None else None
    scan = ImageScan()
    found: dict[Path, str] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise FileNotFoundError(f"no such file or folder: {root}")
        root = root.resolve()
        if root.is_dir():
            for path in _walk(root, exclude, scan):
                found.setdefault(path, (Path(root.name or "root") / path.relative_to(root)).as_posix())
        else:
            found.setdefault(root, root.name)
    scan.images = [InputImage(path, key) for path, key in found.items()]
    return scan


def find_images(paths: Sequence[str | Path], exclude: str | Path | None = None) -> list[InputImage]:
    """The images of `scan_images`; what it skipped is logged (warnings for folders it could not search)."""
    scan = scan_images(paths, exclude)
    for note in scan.notes():
        logger.warning("%s", note)
    return scan.images


def no_images_error(paths: Sequence[str | Path], scan: ImageScan | None = None) -> ValueError:
    """The error for inputs that hold no image (with what the search skipped, when known)."""
    notes = "; ".join(scan.notes()) if scan is not None else ""
    return ValueError(
        f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}"
        + (f" ({notes})" if notes else "")
    )
