"""DAGM 2007: `ClassK/{Train,Test}/NNNN.PNG`, masks `ClassK/{Train,Test}/Label/NNNN_label.PNG` (defects only).

`Label/Labels.txt` (a header line, then whitespace-separated: id, defect flag, image file, 0, label file) says
which images are defective; an image it does not list is judged by whether its label file exists (and reported).
Normal samples get specie_name "good"; defective ones "" (DAGM has no defect folders).
"""

from __future__ import annotations

from pathlib import Path

from vip2clip.data.converters.common import (
    Conversion,
    ConvertOptions,
    find_child,
    list_dirs,
    list_images,
    pair_masks,
    warn_unknown_dirs,
)

DAGM_CLASSES = tuple(f"Class{k}" for k in range(1, 11))


def read_labels_txt(path: Path, conversion: Conversion) -> dict[str, bool]:
    """Labels.txt -> {image file name (lower-case): defective}. Malformed lines are reported and skipped."""
    flags: dict[str, bool] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3 or fields[1] not in ("0", "1"):
            conversion.warn(f"{path}, line {number}", f"cannot parse {line.strip()!r}; line skipped")
            continue
        flags[fields[2].lower()] = fields[1] == "1"
    return flags


def _convert_split(split_dir: Path, split: str, cls_name: str, conversion: Conversion) -> None:
    images = list_images(split_dir)
    label_dir = find_child(split_dir, "Label")
    warn_unknown_dirs(split_dir, ("Label",), conversion=conversion, what="folder (only Label/ is read)")
    labels_txt = label_dir / "Labels.txt" if label_dir is not None else None
    if labels_txt is not None and labels_txt.is_file():
        flags = read_labels_txt(labels_txt, conversion)
        for name in sorted(set(flags) - {image.name.lower() for image in images}):
            conversion.warn(split_dir / name, f"listed in {labels_txt} but missing on disk")
    else:
        flags = None
        conversion.warn(split_dir, "no Label/Labels.txt: an image is defective when its label file exists")
    label_stems = {p.stem.lower() for p in list_images(label_dir)} if label_dir is not None else set()
    defective = []
    for image in images:
        flag = flags.get(image.name.lower()) if flags is not None else None
        if flags is not None and flag is None:
            conversion.warn(image, f"not listed in {labels_txt}; judged by its label file")
        if flag is None:
            flag = f"{image.stem}_label".lower() in label_stems
        if flag:
            defective.append(image)
    masks = pair_masks(defective, label_dir, suffixes=("_label",), conversion=conversion)
    for image in images:  # in file order, normal and defective interleaved as on disk
        anomalous = image in masks
        conversion.add(
            split,
            image,
            mask=masks.get(image),
            cls_name=cls_name,
            specie_name="" if anomalous else "good",
            anomaly=anomalous,
        )


def convert_dagm(root: Path, options: ConvertOptions) -> Conversion:
    """Convert a DAGM root holding Class1 .. Class10."""
    conversion = Conversion(root=root)
    present = {d.name.lower(): d for d in list_dirs(root)}
    for cls_name in DAGM_CLASSES:
        cls_dir = present.get(cls_name.lower())
        if cls_dir is None:
            conversion.warn(root / cls_name, "class folder missing")
            continue
        warn_unknown_dirs(cls_dir, ("Train", "Test"), conversion=conversion, what=f"folder in class {cls_name}")
        for split in ("train", "test"):
            split_dir = find_child(cls_dir, split)
            if split_dir is None:
                conversion.warn(cls_dir / split.capitalize(), "folder missing")
            else:
                _convert_split(split_dir, split, cls_name, conversion)
    warn_unknown_dirs(root, DAGM_CLASSES, conversion=conversion, what="class folder")
    if not conversion.test:
        raise ValueError(f"{root}: no DAGM test images found (expected Class1/Test/*.PNG ...)")
    return conversion
