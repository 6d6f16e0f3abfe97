"""VisA: `CLS/Data/Images/{Normal,Anomaly}/*.JPG`, masks `CLS/Data/Masks/Anomaly/STEM.png`.

The split comes from `split_csv/1cls.csv` (columns object, split, label, image, mask; label normal/anomaly).
Without that file every image is put in the test split (and the counts then differ from the paper's).
Mask pixels are defect-class indices (1..9): `images.load_mask` binarises them with > 0.
Normal samples get specie_name "good", anomalous ones "anomaly".
"""

from __future__ import annotations

import csv
from pathlib import Path

from vip2clip.data.converters.common import (
    Conversion,
    ConvertOptions,
    list_dirs,
    list_images,
    locate,
    pair_masks,
    warn_unknown_dirs,
)

VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
    "pipe_fryum",
)  # fmt: skip
SPLIT_FILE = "split_csv/1cls.csv"
_COLUMNS = ("object", "split", "label", "image")


def _read_split(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            header = [name.strip().lower() for name in reader.fieldnames or []]
            missing = [name for name in _COLUMNS if name not in header]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
            return [{key.strip().lower(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: cannot read the split file ({error})") from None


def _from_split_file(root: Path, split_file: Path, conversion: Conversion) -> None:
    for line, row in enumerate(_read_split(split_file), start=2):
        where = f"{split_file}, line {line}"
        split, label, cls_name = row["split"].lower(), row["label"].lower(), row["object"]
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            conversion.warn(where, f"unexpected split {row['split']!r} or label {row['label']!r}; row skipped")
            continue
        if cls_name not in VISA_CLASSES:
            conversion.warn(where, f"unknown class {cls_name!r}; row skipped")
            continue
        image = root / row["image"]
        if not image.is_file():
            conversion.warn(image, f"listed in {where} but missing on disk; skipped")
            continue
        anomaly = label == "anomaly"
        # An empty mask cell falls back to the naming rule: Data/Masks/Anomaly/STEM.png.
        mask = root / (row.get("mask") or f"{cls_name}/Data/Masks/Anomaly/{image.stem}.png") if anomaly else None
        if mask is not None and not mask.is_file():
            conversion.warn(image, f"anomalous image without its mask ({mask} is missing)")
            mask = None
        conversion.add(
            split, image, mask=mask, cls_name=cls_name, specie_name="anomaly" if anomaly else "good", anomaly=anomaly
        )


def _from_folders(root: Path, conversion: Conversion) -> None:
    present = {d.name: d for d in list_dirs(root)}
    for cls_name in VISA_CLASSES:
        if cls_name not in present:
            conversion.warn(root / cls_name, "class folder missing")
            continue
        images = present[cls_name] / "Data" / "Images"
        for image in list_images(images / "Normal"):
            conversion.add("test", image, mask=None, cls_name=cls_name, specie_name="good", anomaly=False)
        mask_dir = present[cls_name] / "Data" / "Masks" / "Anomaly"
        for image, mask in pair_masks(
            list_images(images / "Anomaly"), mask_dir, suffixes=("",), conversion=conversion
        ).items():
            conversion.add("test", image, mask=mask, cls_name=cls_name, specie_name="anomaly", anomaly=True)


def convert_visa(root: Path, options: ConvertOptions) -> Conversion:
    """Convert a VisA root (the folder holding the class folders and `split_csv/`)."""
    base = locate(root, "candle/Data", depth=1) or locate(root, SPLIT_FILE, depth=1) or root
    conversion = Conversion(root=root)
    split_file = base / SPLIT_FILE
    if split_file.is_file():
        _from_split_file(base, split_file, conversion)
    else:
        conversion.warn(split_file, "split file missing: every image goes to the test split")
        _from_folders(base, conversion)
    warn_unknown_dirs(base, (*VISA_CLASSES, "split_csv"), conversion=conversion, what="class folder")
    for cls_dir in list_dirs(base):
        if cls_dir.name in VISA_CLASSES:
            warn_unknown_dirs(cls_dir, ("Data",), conversion=conversion, what=f"folder in class {cls_dir.name}")
    if not conversion.test:
        raise ValueError(f"{root}: no VisA test images found")
    return conversion
