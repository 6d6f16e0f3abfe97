"""Small dataset trees in the benchmarks' native layouts, written as real (tiny) image files.

Image content encodes nothing the converters read: they index by name. Masks are real masks so that the
loader's binarisation can be checked on them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

SIZE = (12, 8)  # (width, height)


def write_image(path: Path, size: tuple[int, int] = SIZE, seed: int = 0, gray: bool = False) -> Path:
    """A small random image; the format follows the suffix (PNG, JPG, BMP, TIF ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
    return path


def write_with_orientation(pixels: np.ndarray, path: Path, orientation: int) -> Path:
    """Save `pixels` with an EXIF orientation tag (as cameras store portrait photos)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return path


def write_mask(
    path: Path, size: tuple[int, int] = SIZE, value: int = 255, box: tuple[int, int, int, int] = (1, 1, 4, 4)
):
    """A mask with `value` inside `box` = (top, left, bottom, right) and 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    top, left, bottom, right = box
    pixels[top:bottom, left:right] = value
    Image.fromarray(pixels).save(path)
    return path


@cache
def _encoded(suffix: str, mask: bool) -> bytes:
    """The bytes of one tiny image (or 0/255 mask) in the format of `suffix`, encoded once per format."""
    buffer = io.BytesIO()
    pixels = np.zeros((8, 8), dtype=np.uint8) if mask else np.full((8, 8, 3), 128, dtype=np.uint8)
    if mask:
        pixels[2:5, 2:5] = 255
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(suffix.lower(), suffix[1:].upper())
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_copies(folder: Path, names: Iterable[str], mask: bool = False) -> int:
    """Many tiny files fast: the same pre-encoded 8x8 image (or mask) under each name; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in names:
        (folder / name).write_bytes(_encoded(Path(name).suffix, mask))
        count += 1
    return count


def write_images(folder: Path, names: Iterable[str], **kwargs) -> list[Path]:
    return [write_image(folder / name, seed=i, **kwargs) for i, name in enumerate(names)]


def build_mvtec_class(
    cls_dir: Path,
    n_train: int,
    n_good: int,
    defects: dict[str, int],
    mask_suffix: str = "_mask",
    normal: str = "good",
    image_ext: str = ".png",
    mask_ext: str = ".png",
) -> None:
    """`train/NORMAL`, `test/NORMAL`, `test/DEFECT` with a mask per defect image in `ground_truth/DEFECT`."""
    write_images(cls_dir / "train" / normal, [f"{i:03d}{image_ext}" for i in range(n_train)])
    write_images(cls_dir / "test" / normal, [f"{i:03d}{image_ext}" for i in range(n_good)])
    for defect, count in defects.items():
        write_images(cls_dir / "test" / defect, [f"{i:03d}{image_ext}" for i in range(count)])
        for i in range(count):
            write_mask(cls_dir / "ground_truth" / defect / f"{i:03d}{mask_suffix}{mask_ext}")


def build_visa(root: Path, classes: dict[str, tuple[list[str], list[str]]], mask_value: int = 3) -> list[list[str]]:
    """VisA tree for {class: (normal stems, anomaly stems)}; returns the 1cls.csv rows (first half of normals
    and anomalies in train for normals only, like the real split: anomalies are all test)."""
    rows = [["object", "split", "label", "image", "mask"]]
    for cls_name, (normals, anomalies) in classes.items():
        images = root / cls_name / "Data" / "Images"
        write_images(images / "Normal", [f"{stem}.JPG" for stem in normals])
        write_images(images / "Anomaly", [f"{stem}.JPG" for stem in anomalies])
        for stem in anomalies:
            write_mask(root / cls_name / "Data" / "Masks" / "Anomaly" / f"{stem}.png", value=mask_value)
        for i, stem in enumerate(normals):
            split = "train" if i < len(normals) // 2 else "test"
            rows.append([cls_name, split, "normal", f"{cls_name}/Data/Images/Normal/{stem}.JPG", ""])
        for stem in anomalies:
            mask = f"{cls_name}/Data/Masks/Anomaly/{stem}.png"
            rows.append([cls_name, "test", "anomaly", f"{cls_name}/Data/Images/Anomaly/{stem}.JPG", mask])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(",".join(row) for row in rows) + "\n")
    return rows


def build_ksdd_raw(
    root: Path,
    n_kos: int,
    defects: dict[tuple[int, int], tuple[int, int]],
    height: int = 30,
    missing: Iterable[tuple[int, int]] = (),
) -> None:
    """`kosNN/PartN.jpg` + `PartN_label.bmp` (8 parts each); `defects[(kos, part)] = (first row, last row)`.

    `missing` (kos, part) pairs are not written (the real set has 399 images, not 50 x 8)."""
    skipped = set(missing)
    for kos in range(1, n_kos + 1):
        for part in range(8):
            if (kos, part) in skipped:
                continue
            folder = root / f"kos{kos:02d}"
            write_image(folder / f"Part{part}.jpg", size=(4, height), seed=kos * 10 + part, gray=True)
            rows = defects.get((kos, part))
            box = (rows[0], 0, rows[1] + 1, 2) if rows else (0, 0, 0, 0)
            write_mask(folder / f"Part{part}_label.bmp", size=(4, height), box=box)


def write_dagm_labels(path: Path, flags: dict[str, int]) -> None:
    """Labels.txt: a header line, then id, flag, image file, 0, label file (tab-separated)."""
    lines = ["1"]
    for i, (name, flag) in enumerate(flags.items(), start=1):
        label = f"{Path(name).stem}_label.PNG" if flag else "0"
        lines.append(f"{i}\t{flag}\t{name}\t0\t{label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
