"""KolektorSDD (KSDD), in its raw form or as the already-derived 3-crop set in MVTec layout.

Raw form: `kos01`..`kos50`, each with `Part0.jpg`..`Part7.jpg` and `PartN_label.bmp` beside each image.

The ZSAD protocol's derivation, written to `ROOT/zsad_3crop/` in MVTec layout:
1. Every image is cut along its height into 3 crops (rows `[k*H//3, (k+1)*H//3)` for k = 0, 1, 2), named
   `kosNN_PartN_k.png` (lossless PNG, so later reads see exactly the decoded pixels).
2. A crop whose label crop has any non-zero pixel is anomalous: `test/defect/` with
   `ground_truth/defect/NAME_mask.png` (0/255). All anomalous crops are test crops.
3. Normal crops, in natural name order, are shuffled with `numpy.random.default_rng(seed)` (seed 0 by default,
   `--seed` to change); the first `n - (3 * n) // 4` go to `test/good/` and the other `(3 * n) // 4` to
   `train/good/` (train takes the floor of 75%). The real data has 399 images (not 50 x 8): 1197 crops, 54
   anomalous, 1143 normal, giving 286 test normals: the paper's 286/54.
Conversion rewrites the derived folder every time (it is a pure function of the raw data and the seed).
The class name is the release's: "electrical commutators".
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.data.converters.common import Conversion, ConvertOptions, list_dirs, list_images, natural_key
from vip2clip.data.converters.mvtec import ClassLayout, convert_class
from vip2clip.data.images import load_mask
from vip2clip.utils.fileio import atomic_save_image

KSDD_CLASS = "electrical commutators"
DERIVED_DIR = "zsad_3crop"
N_CROPS = 3
_PART = re.compile(r"^part\d+$", re.IGNORECASE)
_KOS = re.compile(r"^kos\d+$", re.IGNORECASE)


def _rows(height: int, k: int) -> tuple[int, int]:
    """(top, bottom) rows of crop k."""
    return k * height // N_CROPS, (k + 1) * height // N_CROPS


def _raw_pairs(kos_dirs: list[Path], conversion: Conversion) -> list[tuple[Path, Path]]:
    """(image, label) pairs of the raw form; images without a label are reported and left out."""
    pairs = []
    for kos in kos_dirs:
        labels = {p.stem.lower(): p for p in list_images(kos) if p.stem.lower().endswith("_label")}
        images = [p for p in list_images(kos) if _PART.match(p.stem)]
        for image in images:
            label = labels.pop(f"{image.stem.lower()}_label", None)
            if label is None:
                conversion.warn(image, "image without its label (PartN_label.bmp); left out")
            else:
                pairs.append((image, label))
        for label in labels.values():
            conversion.warn(label, "label without an image")
    return pairs


def _write_crops(image_path: Path, label_path: Path, out: Path, conversion: Conversion) -> list[tuple[str, bool]]:
    """Cut one image and its label into crops; write anomalous ones (with masks) and return (name, anomalous).

    Normal crops are written later, once the split has decided their folder.
    """
    image = Image.open(image_path)
    image.load()
    label = load_mask(label_path)
    if label.shape != (image.height, image.width):
        conversion.warn(label_path, f"label size {label.shape[::-1]} differs from the image's {image.size}")
    results = []
    for k in range(N_CROPS):
        top, bottom = _rows(image.height, k)
        name = f"{image_path.parent.name}_{image_path.stem}_{k}"
        anomalous = bool(label[top:bottom].any())
        if anomalous:
            atomic_save_image(image.crop((0, top, image.width, bottom)), out / "test" / "defect" / f"{name}.png")
            crop_mask = np.where(label[top:bottom], 255, 0).astype(np.uint8)
            atomic_save_image(Image.fromarray(crop_mask), out / "ground_truth" / "defect" / f"{name}_mask.png")
        results.append((name, anomalous))
    return results


def derive_three_crops(kos_dirs: list[Path], out: Path, *, seed: int, conversion: Conversion) -> None:
    """Write the seeded 3-crop derivation (module docstring) of the raw kos folders into `out`."""
    if out.exists():
        shutil.rmtree(out)
    pairs = _raw_pairs(kos_dirs, conversion)
    normal: list[tuple[str, Path, int]] = []
    for image_path, label_path in pairs:
        for k, (name, anomalous) in enumerate(_write_crops(image_path, label_path, out, conversion)):
            if not anomalous:
                normal.append((name, image_path, k))
    normal.sort(key=lambda item: natural_key(item[0]))
    order = np.random.default_rng(seed).permutation(len(normal))
    n_test = len(normal) - (3 * len(normal)) // 4  # train takes floor(75%): 1143 -> 286 test, as in the paper
    folders: dict[Path, list[tuple[str, int, str]]] = {}
    for rank, position in enumerate(order):
        name, image_path, k = normal[position]
        folders.setdefault(image_path, []).append((name, k, "test" if rank < n_test else "train"))
    for image_path, crops in folders.items():  # decode each image once for all its normal crops
        with Image.open(image_path) as image:
            for name, k, split in crops:
                top, bottom = _rows(image.height, k)
                crop = image.crop((0, top, image.width, bottom))
                atomic_save_image(crop, out / split / "good" / f"{name}.png")
    conversion.notes.append(f"derived {len(normal)} normal crops ({n_test} to test, seed {seed}) into {out}")


def convert_ksdd(root: Path, options: ConvertOptions) -> Conversion:
    """Convert KSDD: the raw kosNN form (deriving the 3-crop set) or an already-derived MVTec-style copy."""
    conversion = Conversion(root=root)
    kos_dirs = [d for d in list_dirs(root) if _KOS.match(d.name)]
    if kos_dirs:
        derive_three_crops(kos_dirs, root / DERIVED_DIR, seed=options.seed, conversion=conversion)
        convert_class(root / DERIVED_DIR, KSDD_CLASS, layout=ClassLayout(), conversion=conversion)
        return conversion
    derived = next((d for d in [root, *list_dirs(root)] if (d / "test").is_dir()), None)
    if derived is None:
        raise ValueError(f"{root}: neither raw KSDD folders (kos01 ...) nor a derived copy (test/good, test/defect)")
    convert_class(derived, KSDD_CLASS, layout=ClassLayout(), conversion=conversion)
    return conversion
