"""MVTec-style layouts: MVTec AD, MPDD, DTD-Synthetic and BTAD.

`CLS/train/NORMAL/*`, `CLS/test/NORMAL/*`, `CLS/test/DEFECT/*`, masks `CLS/ground_truth/DEFECT/STEM{suffix}.*`.
NORMAL is `good` (BTAD: `ok`). Normal samples get specie_name "good"; anomalous ones the DEFECT folder name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vip2clip.data.converters.common import (
    Conversion,
    ConvertOptions,
    find_child,
    list_dirs,
    list_images,
    locate,
    pair_masks,
    warn_nested_dirs,
    warn_unknown_dirs,
)

MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
DTD_CLASSES = (
    "Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068", "Woven_125",
    "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069",
)  # fmt: skip
BTAD_CLASSES = ("01", "02", "03")


@dataclass(frozen=True)
class ClassLayout:
    """How one class folder is laid out: the normal folder's name and the mask-name suffixes to try."""

    normal_dir: str = "good"
    mask_suffixes: tuple[str, ...] = ("_mask",)


def convert_class(cls_dir: Path, cls_name: str, *, layout: ClassLayout, conversion: Conversion) -> None:
    """Add one MVTec-style class folder (train normals; test normals and defects with their masks). Folders the
    layout does not explain (in the class, in train/, inside image folders) are reported."""
    train_dir, test_dir = find_child(cls_dir, "train"), find_child(cls_dir, "test")
    warn_unknown_dirs(
        cls_dir, ("train", "test", "ground_truth"), conversion=conversion, what=f"folder in class {cls_name}"
    )
    if train_dir is not None:
        warn_unknown_dirs(
            train_dir, (layout.normal_dir,), conversion=conversion, what=f"training folder (only {layout.normal_dir}/)"
        )
        warn_nested_dirs([train_dir / layout.normal_dir], conversion)
        for image in list_images(train_dir / layout.normal_dir):
            conversion.add("train", image, mask=None, cls_name=cls_name, specie_name="good", anomaly=False)
    if test_dir is None:
        conversion.warn(cls_dir, "class folder without a test/ folder; class skipped")
        return
    ground_truth = find_child(cls_dir, "ground_truth")
    defect_dirs = [d for d in list_dirs(test_dir) if d.name != layout.normal_dir]
    if not (test_dir / layout.normal_dir).is_dir():
        conversion.warn(test_dir / layout.normal_dir, "no normal test images (folder missing)")
    warn_nested_dirs([test_dir / layout.normal_dir, *defect_dirs], conversion)
    for image in list_images(test_dir / layout.normal_dir):
        conversion.add("test", image, mask=None, cls_name=cls_name, specie_name="good", anomaly=False)
    for defect_dir in defect_dirs:
        mask_dir = find_child(ground_truth, defect_dir.name) if ground_truth is not None else None
        pairs = pair_masks(list_images(defect_dir), mask_dir, suffixes=layout.mask_suffixes, conversion=conversion)
        for image, mask in pairs.items():
            conversion.add("test", image, mask=mask, cls_name=cls_name, specie_name=defect_dir.name, anomaly=True)
    if ground_truth is not None:
        defect_names = {d.name.lower() for d in defect_dirs}
        for mask_dir in list_dirs(ground_truth):
            if mask_dir.name.lower() not in defect_names:
                conversion.warn(mask_dir, "masks of a defect type with no test images")


def convert_classes(
    root: Path, classes: Sequence[str], *, layout: ClassLayout, conversion: Conversion, extra_ok: Sequence[str] = ()
) -> None:
    """Convert every expected class folder under `root`; report missing classes and unknown folders."""
    present = {d.name: d for d in list_dirs(root)}
    for cls_name in classes:
        if cls_name in present:
            convert_class(present[cls_name], cls_name, layout=layout, conversion=conversion)
        else:
            conversion.warn(root / cls_name, "class folder missing")
    for name, folder in present.items():
        if name not in classes and name not in extra_ok:
            conversion.warn(folder, "unknown class folder; ignored")
    if not conversion.test:
        found = ", ".join(present) or "none"
        raise ValueError(
            f"{root}: no test images found in the expected layout CLASS/test/... "
            f"(expected classes: {', '.join(classes)}; folders found: {found})"
        )


def convert_mvtec(root: Path, options: ConvertOptions) -> Conversion:
    conversion = Conversion(root=root)
    convert_classes(root, MVTEC_CLASSES, layout=ClassLayout(), conversion=conversion)
    return conversion


def convert_mpdd(root: Path, options: ConvertOptions) -> Conversion:
    conversion = Conversion(root=root)
    convert_classes(root, MPDD_CLASSES, layout=ClassLayout(), conversion=conversion)
    return conversion


def convert_dtd(root: Path, options: ConvertOptions) -> Conversion:
    # The mask naming of DTD-Synthetic is not confirmed: accept `STEM_mask.*` and `STEM.*`.
    conversion = Conversion(root=root)
    convert_classes(root, DTD_CLASSES, layout=ClassLayout(mask_suffixes=("_mask", "")), conversion=conversion)
    return conversion


def convert_btad(root: Path, options: ConvertOptions) -> Conversion:
    # Masks share the image's stem; the extension differs by class (01: .bmp images, .png masks).
    base = locate(root, "BTech_Dataset_transformed", depth=1)
    data_root = base / "BTech_Dataset_transformed" if base is not None else root
    conversion = Conversion(root=root)
    convert_classes(
        data_root, BTAD_CLASSES, layout=ClassLayout(normal_dir="ok", mask_suffixes=("",)), conversion=conversion
    )
    return conversion
