"""A seeded synthetic benchmark in MVTec layout, for the offline demo and for tests.

`CLS/train/good/NNN.png`, `CLS/test/good/NNN.png`, `CLS/test/KIND/NNN.png` and masks
`CLS/ground_truth/KIND/NNN_mask.png` (0/255), plus the index `meta.json`.

Normal images are either *textured* (two sinusoids plus noise in a per-class two-colour palette) or
*structured* (a simple object on a faintly textured background). Every normal pixel stays at or below
`_NORMAL_MAX` in each channel.

Defects (scratches, blobs, pasted patches of another texture, colour stains) are always *brighter* than the
normal palette in every channel (at least `_DEFECT_MIN`): a tiny random CLIP's patch tokens are close to a
linear function of the pixels, so it can only learn defects that differ from normal in one consistent
direction (see the project's notes on the tiny backbone). The mask is exactly the set of changed pixels.

Each image has its own random stream derived from (seed, class, split, number), so the output is the same
byte for byte for a seed, and adding images to one folder does not change the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.data.index import INDEX_NAME, DatasetIndex, Sample, build_index, write_index
from vip2clip.utils.fileio import atomic_save_image

STYLES = ("textured", "structured")
DEFECT_KINDS = ("scratch", "blob", "patch", "stain")
_NORMAL_MAX = 0.6
_DEFECT_MIN = 0.65
# Defect colours (RGB in [0, 1]); all channels >= _DEFECT_MIN so a defect is brighter everywhere.
_DEFECT_COLOURS = {"scratch": (0.95, 0.95, 0.95), "blob": (1.0, 0.92, 0.65), "stain": (1.0, 0.68, 0.88)}
_SPLIT_CODES = {"train": 0, "test": 1}


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What `generate_benchmark` builds; validated on creation."""

    classes: int = 2
    seed: int = 0
    image_size: int = 128
    n_train_good: int = 4
    n_test_good: int = 6
    n_test_defect: int = 6
    style: str = "textured"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"unknown synthetic style {self.style!r}; valid: {', '.join(STYLES)}")
        if self.classes < 1:
            raise ValueError(f"classes must be >= 1, got {self.classes}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        for name in ("n_train_good", "n_test_good", "n_test_defect"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def class_names(self) -> list[str]:
        prefix = "texture" if self.style == "textured" else "object"
        return [f"{prefix}_{k}" for k in range(self.classes)]


@dataclass(frozen=True, kw_only=True)
class _ClassLook:
    """Per-class appearance: palette, sinusoid frequencies/orientations and (structured) the object shape."""

    base: np.ndarray  # [3]
    accent: np.ndarray  # [3]
    frequencies: tuple[float, float]
    angles: tuple[float, float]
    shape: str


def _class_look(seed: int, class_id: int) -> _ClassLook:
    rng = np.random.default_rng([seed, class_id, 7])
    base = rng.uniform(0.05, 0.3, size=3)
    accent = np.clip(base + rng.uniform(0.1, 0.3, size=3), 0.0, _NORMAL_MAX - 0.05)
    return _ClassLook(
        base=base,
        accent=accent,
        frequencies=(float(rng.uniform(2.5, 6.0)), float(rng.uniform(5.0, 10.0))),
        angles=(float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi))),
        shape=("disk", "square", "ring")[class_id % 3],
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (y, x), each [S, S]."""
    coords = (np.arange(size) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="ij")


def _waves(look: _ClassLook, size: int, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Sum of the class's two oriented sinusoids with random phases, in [0.5 - a, 0.5 + a]: [S, S]."""
    y, x = _grid(size)
    total = np.zeros((size, size))
    for frequency, angle in zip(look.frequencies, look.angles, strict=True):
        angle += rng.normal(0.0, 0.05)  # a little per-image variation, still clearly the same texture
        phase = rng.uniform(0, 2 * np.pi)
        total += np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    return 0.5 + amplitude * total / 2


def _object_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool [S, S] of a centred object (jittered position and size)."""
    y, x = _grid(size)
    cy, cx = 0.5 + rng.uniform(-0.05, 0.05, size=2)
    radius = rng.uniform(0.25, 0.32)
    if shape == "square":
        return (np.abs(y - cy) < radius * 0.9) & (np.abs(x - cx) < radius * 0.9)
    distance = np.hypot(y - cy, x - cx)
    if shape == "ring":
        return (distance < radius) & (distance > radius * 0.55)
    return distance < radius


def normal_image(look: _ClassLook, style: str, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free image, float [S, S, 3] with every value in [0, _NORMAL_MAX]."""
    if style == "textured":
        weight = _waves(look, size, rng, amplitude=0.5)[..., None]
        pixels = look.base * (1 - weight) + look.accent * weight
    else:
        background = look.base * (0.85 + 0.3 * _waves(look, size, rng, amplitude=0.2)[..., None])
        pixels = np.where(_object_mask(look.shape, size, rng)[..., None], look.accent, background)
    pixels = pixels + rng.normal(0.0, 0.025, size=(size, size, 3))
    return np.clip(pixels, 0.0, _NORMAL_MAX)


def _ellipses_mask(size: int, rng: np.random.Generator, count: int, radius: tuple[float, float]) -> np.ndarray:
    """Union of `count` random ellipses near one centre (a blob or a stain): bool [S, S]."""
    y, x = _grid(size)
    centre = rng.uniform(0.25, 0.75, size=2)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(count):
        cy, cx = centre + rng.normal(0.0, radius[1] * 0.6, size=2)
        ry, rx = rng.uniform(*radius, size=2)
        mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1.0
    return mask


def _scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thick straight segment: bool [S, S]."""
    y, x = _grid(size)
    start = rng.uniform(0.2, 0.8, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.35, 0.6)
    half_width = max(1.5 / size, 0.022)
    direction = np.array([np.sin(angle), np.cos(angle)])
    along = (y - start[0]) * direction[0] + (x - start[1]) * direction[1]
    across = -(y - start[0]) * direction[1] + (x - start[1]) * direction[0]
    return (along >= 0) & (along <= length) & (np.abs(across) <= half_width)


def _patch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """An axis-aligned rectangle: bool [S, S]."""
    height, width = (rng.uniform(0.15, 0.3, size=2) * size).astype(int) + 1
    top, left = rng.integers(0, size - height + 1), rng.integers(0, size - width + 1)
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def _defect_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect region of a minimum area (about 1.5 % of the image), so it covers at least a few patches."""
    makers = {
        "scratch": lambda: _scratch_mask(size, rng),
        "blob": lambda: _ellipses_mask(size, rng, count=1, radius=(0.07, 0.15)),
        "stain": lambda: _ellipses_mask(size, rng, count=4, radius=(0.04, 0.1)),
        "patch": lambda: _patch_mask(size, rng),
    }
    while True:
        mask = makers[kind]()
        if mask.sum() >= 0.015 * size * size:
            return mask


def add_defect(pixels: np.ndarray, kind: str, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` on float [S, S, 3]; returns (new pixels [S, S, 3], bool mask [S, S])."""
    size = pixels.shape[0]
    mask = _defect_mask(kind, size, rng)
    if kind == "patch":
        # A pasted piece of a different, finer texture (a bright cyan-tinted checkerboard).
        y, x = _grid(size)
        cells = max(size // 16, 2)
        checker = ((np.floor(y * size / cells) + np.floor(x * size / cells)) % 2)[..., None]
        paint = np.array([_DEFECT_MIN, 0.8, 0.9]) + checker * np.array([0.15, 0.15, 0.1])
    else:
        paint = np.broadcast_to(np.array(_DEFECT_COLOURS[kind]), pixels.shape)
    paint = paint + rng.normal(0.0, 0.02, size=pixels.shape)
    painted = np.where(mask[..., None], np.clip(paint, _DEFECT_MIN, 1.0), pixels)
    return painted, mask


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(pixels * 255).astype(np.uint8))


def _check_out_dir(out_dir: Path) -> None:
    # Refuse to scatter files into an unrelated non-empty folder; regenerating an earlier benchmark is fine.
    if out_dir.is_file():
        raise ValueError(f"{out_dir}: is a file, expected a folder for the synthetic benchmark")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / INDEX_NAME).is_file():
        raise ValueError(f"{out_dir}: folder is not empty and holds no {INDEX_NAME}; choose an empty or new folder")


def _write_class(out_dir: Path, config: SynthConfig, class_id: int, name: str) -> tuple[list[Sample], list[Sample]]:
    """Write one class's images and masks; returns (train samples, test samples)."""
    look = _class_look(config.seed, class_id)
    size = config.image_size

    def image_rng(split: str, number: int) -> np.random.Generator:
        return np.random.default_rng([config.seed, class_id, _SPLIT_CODES[split], number])

    train, test = [], []
    for split, count, samples in (("train", config.n_train_good, train), ("test", config.n_test_good, test)):
        for i in range(count):
            relative = f"{name}/{split}/good/{i:03d}.png"
            atomic_save_image(
                _to_image(normal_image(look, config.style, size=size, rng=image_rng(split, i))), out_dir / relative
            )
            samples.append(Sample(img_path=relative, mask_path="", cls_name=name, specie_name="good", anomaly=0))
    per_kind: dict[str, int] = {}
    for j in range(config.n_test_defect):
        kind = DEFECT_KINDS[j % len(DEFECT_KINDS)]
        number = per_kind[kind] = per_kind.get(kind, -1) + 1
        rng = image_rng("test", 1000 + j)
        pixels, mask = add_defect(normal_image(look, config.style, size=size, rng=rng), kind, rng=rng)
        relative, mask_relative = (
            f"{name}/test/{kind}/{number:03d}.png",
            f"{name}/ground_truth/{kind}/{number:03d}_mask.png",
        )
        atomic_save_image(_to_image(pixels), out_dir / relative)
        atomic_save_image(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)), out_dir / mask_relative)
        test.append(Sample(img_path=relative, mask_path=mask_relative, cls_name=name, specie_name=kind, anomaly=1))
    return train, test


def generate_benchmark(
    out_dir: str | Path,
    *,
    classes: int = 2,
    seed: int = 0,
    image_size: int = 128,
    n_train_good: int = 4,
    n_test_good: int = 6,
    n_test_defect: int = 6,
    style: str = "textured",
) -> DatasetIndex:
    """Write a synthetic benchmark (MVTec layout + meta.json) into `out_dir` and return its index.

    Defect kinds cycle through DEFECT_KINDS (scratch, blob, patch, stain). Deterministic for a seed.
    Raises ValueError for bad arguments or a non-empty `out_dir` that is not an earlier benchmark.
    """
    config = SynthConfig(
        classes=classes,
        seed=seed,
        image_size=image_size,
        n_train_good=n_train_good,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        style=style,
    )
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train: list[Sample] = []
    test: list[Sample] = []
    for class_id, name in enumerate(config.class_names()):
        class_train, class_test = _write_class(out_dir, config, class_id, name)
        train += class_train
        test += class_test
    index = build_index(out_dir, {"train": train, "test": test})
    write_index(index)
    return index
