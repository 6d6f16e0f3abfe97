"""A generic layout for users' own data: `good/` plus any other folder of defects, optional masks.

Single class: `ROOT/good/*`, `ROOT/DEFECT/*`, masks `ROOT/ground_truth/DEFECT/STEM.*` or `STEM_mask.*`
(class name: the root folder's name). Several classes: `ROOT/CLASS/good/...` for each CLASS folder.
Every image goes to the test split (zero-shot evaluation). Anomalous images need not have masks.
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
    warn_nested_dirs,
    warn_unknown_dirs,
)

NORMAL_DIR = "good"
MASK_DIR = "ground_truth"


def _convert_folder_class(cls_dir: Path, cls_name: str, conversion: Conversion) -> None:
    for image in list_images(cls_dir / NORMAL_DIR):
        conversion.add("test", image, mask=None, cls_name=cls_name, specie_name="good", anomaly=False)
    ground_truth = find_child(cls_dir, MASK_DIR)
    defect_dirs = [d for d in list_dirs(cls_dir) if d.name not in (NORMAL_DIR, MASK_DIR)]
    warn_nested_dirs([cls_dir / NORMAL_DIR, *defect_dirs], conversion)
    if ground_truth is not None:
        warn_unknown_dirs(
            ground_truth, [d.name for d in defect_dirs], conversion=conversion, what="mask folder (no defect folder)"
        )
    for defect_dir in defect_dirs:
        mask_dir = find_child(ground_truth, defect_dir.name) if ground_truth is not None else None
        images = list_images(defect_dir)
        if mask_dir is None:  # masks are optional here: an image-level set is a valid user dataset
            pairs: dict[Path, Path | None] = dict.fromkeys(images)
        else:
            pairs = pair_masks(images, mask_dir, suffixes=("_mask", ""), conversion=conversion)
        for image, mask in pairs.items():
            conversion.add("test", image, mask=mask, cls_name=cls_name, specie_name=defect_dir.name, anomaly=True)


def convert_folder(root: Path, options: ConvertOptions) -> Conversion:
    """Convert `ROOT/good` + defect folders (one class) or `ROOT/CLASS/good` + ... (several classes)."""
    conversion = Conversion(root=root)
    if (root / NORMAL_DIR).is_dir():
        _convert_folder_class(root, root.resolve().name, conversion)
    else:
        for cls_dir in list_dirs(root):
            if (cls_dir / NORMAL_DIR).is_dir():
                _convert_folder_class(cls_dir, cls_dir.name, conversion)
            else:
                conversion.warn(cls_dir, f"class folder without a {NORMAL_DIR}/ folder; ignored")
    if not conversion.test:
        raise ValueError(f"{root}: no images found; expected {NORMAL_DIR}/ and defect folders (or CLASS/{NORMAL_DIR}/)")
    return conversion
