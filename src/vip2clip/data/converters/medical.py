"""Medical sets (every image is a test image): HeadCT, BrainMRI, Br35H, ISIC, CVC-ClinicDB, CVC-ColonDB, Kvasir,
Endo (EndoTect 2020, Table 9 only).

Normal samples get specie_name "good"; anomalous ones the folder that labels them (`yes` for BrainMRI and
Br35H) or "" where the label comes from elsewhere. Each converter also finds its data one level down (a
download unpacked into its own folder).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
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


def _image_folder(root: Path, name: str) -> Path | None:
    """The innermost `name/` (downloads sometimes nest `head_ct/head_ct/`) that holds images."""
    base = locate(root, name, depth=1)
    folder = base / name if base is not None else None
    while folder is not None and not list_images(folder) and (folder / name).is_dir():
        folder = folder / name
    return folder


def _read_headct_labels(path: Path) -> dict[int, bool]:
    """labels.csv -> {id: hemorrhage}; the header may carry spaces (`id, hemorrhage`)."""
    with path.open(newline="", encoding="utf-8-sig") as stream:
        rows = list(csv.reader(stream))
    header = [name.strip().lower() for name in rows[0]] if rows else []
    if "id" not in header or "hemorrhage" not in header:
        raise ValueError(f"{path}: expected columns 'id' and 'hemorrhage', found {header}")
    id_col, flag_col = header.index("id"), header.index("hemorrhage")
    try:
        return {int(row[id_col]): row[flag_col].strip() == "1" for row in rows[1:] if row}
    except (ValueError, IndexError) as error:
        raise ValueError(f"{path}: malformed row ({error})") from None


def convert_headct(root: Path, options: ConvertOptions) -> Conversion:
    conversion = Conversion(root=root)
    folder = _image_folder(root, "head_ct")
    if folder is None:
        raise ValueError(f"{root}: no head_ct/ folder of images found")
    labels_base = locate(root, "labels.csv", depth=2)
    if labels_base is not None:
        labels = _read_headct_labels(labels_base / "labels.csv")
    else:
        conversion.warn(root / "labels.csv", "missing; ids 000-099 taken as hemorrhage (the published labelling)")
        labels = {i: i < 100 for i in range(200)}
    images = {int(p.stem): p for p in list_images(folder) if p.stem.isdigit()}
    for image_id, hemorrhage in sorted(labels.items()):
        if image_id not in images:
            conversion.warn(folder / f"{image_id:03d}.png", "listed in labels.csv but missing on disk")
            continue
        conversion.add(
            "test",
            images.pop(image_id),
            mask=None,
            cls_name="brain",
            specie_name="" if hemorrhage else "good",
            anomaly=hemorrhage,
        )
    for image in images.values():
        conversion.warn(image, "image without a label in labels.csv; left out")
    return conversion


def _yes_no(data: Path, cls_name: str, conversion: Conversion) -> None:
    for label, anomalous in (("no", False), ("yes", True)):
        for image in list_images(data / label):
            conversion.add(
                "test",
                image,
                mask=None,
                cls_name=cls_name,
                specie_name="yes" if anomalous else "good",
                anomaly=anomalous,
            )


def convert_brainmri(root: Path, options: ConvertOptions) -> Conversion:
    # The download holds brain_tumor_dataset/{yes,no} and a duplicate top-level {yes,no}: count one copy.
    conversion = Conversion(root=root)
    base = locate(root, "brain_tumor_dataset/yes", depth=1)
    data = base / "brain_tumor_dataset" if base is not None else locate(root, "yes", depth=1)
    if data is None or not (data / "no").is_dir():
        raise ValueError(f"{root}: no brain_tumor_dataset/ (or yes/ and no/) folders found")
    if base is not None and (base / "yes").is_dir():
        conversion.notes.append(f"{base / 'yes'} and {base / 'no'} duplicate {data}: counted once")
    _yes_no(data, "brain", conversion)
    return conversion


def convert_br35h(root: Path, options: ConvertOptions) -> Conversion:
    # Only yes/ and no/ count: pred/ is unlabelled and Br35H-Mask-RCNN/ holds copies.
    conversion = Conversion(root=root)
    data = locate(root, "yes", depth=1)
    if data is None or not (data / "no").is_dir():
        raise ValueError(f"{root}: no yes/ and no/ folders found")
    ignored = [d for d in list_dirs(data) if d.name.lower() in ("pred", "br35h-mask-rcnn")]
    if ignored:
        conversion.notes.append(f"ignored (not labelled test data): {', '.join(str(d) for d in ignored)}")
    warn_unknown_dirs(data, ("yes", "no", "pred", "Br35H-Mask-RCNN"), conversion=conversion, what="folder")
    _yes_no(data, "brain", conversion)
    return conversion


def _paired_folders(
    root: Path, layouts: Sequence[tuple[str, str]], *, suffix: str, cls_name: str, conversion: Conversion
) -> None:
    """Anomalous images with masks from the first (image folder, mask folder) layout found under `root`."""
    found: dict[Path, tuple[Path, str, str]] = {}
    for images, masks in layouts:
        base = locate(root, images, depth=1)
        if base is not None:  # two layouts can find the same folder (root/PNG/Original is also "Original")
            found.setdefault((base / images).resolve(), (base, images, masks))
    if not found:
        raise ValueError(f"{root}: none of the expected folders found ({', '.join(i for i, _ in layouts)})")
    (base, image_dir, mask_dir), *others = found.values()
    for other_base, other_images, _ in others:
        conversion.notes.append(f"{other_base / other_images}: another copy of the images; ignored")
    mask_folder = base / mask_dir if (base / mask_dir).is_dir() else None
    for image, mask in pair_masks(
        list_images(base / image_dir), mask_folder, suffixes=(suffix,), conversion=conversion
    ).items():
        conversion.add("test", image, mask=mask, cls_name=cls_name, specie_name="", anomaly=True)


def convert_isic(root: Path, options: ConvertOptions) -> Conversion:
    conversion = Conversion(root=root)
    layout = ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth")
    _paired_folders(root, [layout], suffix="_Segmentation", cls_name="skin", conversion=conversion)
    return conversion


def convert_clinicdb(root: Path, options: ConvertOptions) -> Conversion:
    conversion = Conversion(root=root)
    layouts = [("Original", "Ground Truth"), ("PNG/Original", "PNG/Ground Truth"), ("images", "masks")]
    _paired_folders(root, layouts, suffix="", cls_name="colon", conversion=conversion)
    return conversion


def convert_colondb(root: Path, options: ConvertOptions) -> Conversion:
    conversion = Conversion(root=root)
    _paired_folders(root, [("images", "masks")], suffix="", cls_name="colon", conversion=conversion)
    return conversion


def convert_kvasir(root: Path, options: ConvertOptions) -> Conversion:
    # Masks are JPEG: images.load_mask binarises them at half of 255 instead of > 0.
    conversion = Conversion(root=root)
    _paired_folders(root, [("images", "masks")], suffix="", cls_name="colon", conversion=conversion)
    return conversion


def convert_endo(root: Path, options: ConvertOptions) -> Conversion:
    """The EndoTect 2020 segmentation test set (the paper's "Endo", Table 9), as downloaded from the authors' link:
    `images/` and `masks/` (masks paired by name, any image extension), at the root or one folder down
    (`EndoTect_2020_Segmentation_Test_Dataset/`). As the authors' index script reads it, every other folder beside
    `masks/` holds polyp images too, and a `good/` folder would hold normal ones."""
    conversion = Conversion(root=root)
    base = locate(root, "masks", depth=1)
    if base is None or not (base / "masks").is_dir():
        raise ValueError(f"{root}: no masks/ folder found (EndoTect: images/ and masks/, paired by name)")
    folders = [folder for folder in list_dirs(base) if folder.name.lower() != "masks"]
    if not any(list_images(folder) for folder in folders):
        raise ValueError(f"{base}: no folder of images beside masks/ (expected images/)")
    anomalous = []
    for folder in folders:
        if folder.name.lower() == "good":
            for image in list_images(folder):
                conversion.add("test", image, mask=None, cls_name="colon", specie_name="good", anomaly=False)
        else:
            anomalous += list_images(folder)
    # One pairing over all polyp folders: a mask is reported only when no folder has its image.
    for image, mask in pair_masks(anomalous, base / "masks", suffixes=("",), conversion=conversion).items():
        conversion.add("test", image, mask=mask, cls_name="colon", specie_name="", anomaly=True)
    return conversion
