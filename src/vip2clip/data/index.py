"""The dataset index: `meta.json` at a dataset root, in the AnomalyCLIP / ViP²-CLIP format.

Layout: `{"train": {CLASS: [SAMPLE, ...]}, "test": {CLASS: [SAMPLE, ...]}}` with
SAMPLE = `{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}` and paths relative to the root.

The reader is lenient because files written by other projects differ: capitalised split keys (`"Test"`),
an extra `normal_path` key, absolute paths, `//` inside paths, `anomaly` as a bool or a string, a missing
`mask_path`. The writer produces only the clean form (lower-case splits, relative paths, 4-space indent).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from vip2clip.utils.fileio import atomic_write_text

INDEX_NAME = "meta.json"
SPLITS = ("train", "test")
_REPEATED_SLASHES = re.compile(r"(?<!^)/{2,}")


class IndexFormatError(ValueError):
    """A meta.json that cannot be read as an index; the message names the file and the problem."""


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One image of the index. `mask_path` is "" when there is no mask; `anomaly` is 0 or 1."""

    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "img_path": self.img_path,
            "mask_path": self.mask_path,
            "cls_name": self.cls_name,
            "specie_name": self.specie_name,
            "anomaly": self.anomaly,
        }


@dataclass(frozen=True)
class ClassCounts:
    """Per-class numbers of one split: normal and anomalous images, and anomalous images with a mask."""

    cls_name: str
    normal: int
    anomalous: int
    masks: int


@dataclass(frozen=True)
class DroppedMask:
    """A mask path given on a normal row (`where`: split/class[position]); the sample keeps no mask, and the
    index checks (`vip2clip.data.validate.index_problems`) refuse it when the mask marks defect pixels."""

    where: str
    img_path: str
    mask_path: str


@dataclass
class DatasetIndex:
    """Split -> class -> samples (split keys lower-case), with the root the sample paths are relative to.

    dropped_masks: the masks of normal rows, which the reader does not keep (see `DroppedMask`)."""

    root: Path
    splits: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    dropped_masks: list[DroppedMask] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for split in SPLITS:
            self.splits.setdefault(split, {})

    def _split(self, split: str) -> dict[str, list[Sample]]:
        key = split.lower()
        if key not in self.splits:
            raise ValueError(f"{self.root}: the index has no split {split!r} (it has: {', '.join(self.splits)})")
        return self.splits[key]

    def classes(self, split: str = "test") -> list[str]:
        """Class names of a split that have at least one sample, in index order."""
        return [name for name, samples in self._split(split).items() if samples]

    def samples(self, split: str = "test", classes: Sequence[str] | None = None) -> list[Sample]:
        """All samples of a split, or of the given classes only (an unknown class is an error)."""
        by_class = self._split(split)
        if classes is None:
            return [sample for samples in by_class.values() for sample in samples]
        unknown = [name for name in classes if name not in by_class]
        if unknown:
            raise ValueError(
                f"{self.root}: unknown class(es) {', '.join(unknown)} in split {split!r}; "
                f"valid: {', '.join(by_class) or '(none)'}"
            )
        return [sample for name in classes for sample in by_class[name]]

    def resolve(self, relative_or_absolute: str) -> Path:
        """Path of a sample file on disk.

        Relative paths are joined to the root. An absolute path is used as is when it exists; otherwise (an
        index written on another machine) the longest tail of it that exists under this root is used, so that
        `/old/place/mvtec/bottle/test/good/000.png` still resolves against a root that holds `bottle/...`.
        """
        cleaned = clean_path(relative_or_absolute)
        if not posixpath.isabs(cleaned) and not Path(cleaned).is_absolute():
            return self.root / cleaned
        absolute = Path(cleaned)
        if absolute.exists():
            return absolute
        parts = PurePosixPath(cleaned).parts[1:]
        for start in range(len(parts)):
            candidate = self.root.joinpath(*parts[start:])
            if candidate.exists():
                return candidate
        return absolute

    def counts(self, split: str = "test") -> list[ClassCounts]:
        """Per-class counts of a split, in index order."""
        return [
            ClassCounts(
                cls_name=name,
                normal=sum(1 for s in samples if not s.anomaly),
                anomalous=sum(1 for s in samples if s.anomaly),
                masks=sum(1 for s in samples if s.anomaly and s.mask_path),
            )
            for name, samples in self._split(split).items()
        ]


def clean_path(path: str) -> str:
    """Forward slashes, no repeated `//` (a leading `//` is kept: it names a network share)."""
    return _REPEATED_SLASHES.sub("/", str(path).replace("\\", "/"))


def build_index(root: str | Path, splits: Mapping[str, Iterable[Sample]]) -> DatasetIndex:
    """Group flat sample lists by class (classes in first-seen order): `{"test": [...]}` -> DatasetIndex."""
    grouped: dict[str, dict[str, list[Sample]]] = {}
    for split, samples in splits.items():
        by_class = grouped.setdefault(split.lower(), {})
        for sample in samples:
            by_class.setdefault(sample.cls_name, []).append(sample)
    return DatasetIndex(root=Path(root), splits=grouped)


def _index_file(path: str | Path) -> Path:
    path = Path(path)
    return path / INDEX_NAME if path.is_dir() else path


def _parse_anomaly(value: Any, where: str) -> int:
    # Other writers store the label as 0/1, True/False or "0"/"1".
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise IndexFormatError(f"{where}: 'anomaly' must be 0 or 1, got {value!r}")


def _parse_sample(raw: Any, cls_key: str, where: str) -> Sample:
    if not isinstance(raw, Mapping):
        raise IndexFormatError(f"{where}: expected an object with 'img_path', got {type(raw).__name__}")
    if not isinstance(raw.get("img_path"), str) or not raw["img_path"]:
        raise IndexFormatError(f"{where}: missing or empty 'img_path'")
    mask_path = raw.get("mask_path") or ""
    if not isinstance(mask_path, str):
        raise IndexFormatError(f"{where}: 'mask_path' must be a string, got {mask_path!r}")
    anomaly = _parse_anomaly(raw.get("anomaly", 1 if mask_path else 0), where)
    return Sample(
        img_path=clean_path(raw["img_path"]),
        # A mask on a normal image is an empty mask: keep the pairing rule "normal <=> no mask".
        mask_path=clean_path(mask_path) if anomaly else "",
        cls_name=str(raw.get("cls_name") or cls_key),
        specie_name=str(raw.get("specie_name") or ""),
        anomaly=anomaly,
    )


def parse_index(data: Any, root: str | Path, *, source: str = INDEX_NAME) -> DatasetIndex:
    """Decoded meta.json content -> DatasetIndex (lenient; see the module docstring). `source` names errors."""
    if not isinstance(data, Mapping):
        raise IndexFormatError(f"{source}: expected a JSON object of splits, got {type(data).__name__}")
    splits: dict[str, dict[str, list[Sample]]] = {}
    dropped: list[DroppedMask] = []
    for split_key, by_class in data.items():
        split = str(split_key).lower()
        if split in splits:
            raise IndexFormatError(f"{source}: split {split!r} appears twice (keys differ only in case)")
        if not isinstance(by_class, Mapping):
            raise IndexFormatError(f"{source}: split {split_key!r} must map class names to lists of samples")
        splits[split] = {}
        for cls_key, raw_samples in by_class.items():
            if not isinstance(raw_samples, list):
                raise IndexFormatError(f"{source}: {split_key}/{cls_key} must be a list of samples")
            splits[split][str(cls_key)] = [
                _parse_sample(raw, str(cls_key), f"{source}: {split_key}/{cls_key}[{i}]")
                for i, raw in enumerate(raw_samples)
            ]
            dropped += [
                DroppedMask(f"{split}/{cls_key}[{i}]", sample.img_path, clean_path(raw["mask_path"]))
                for i, (raw, sample) in enumerate(zip(raw_samples, splits[split][str(cls_key)], strict=True))
                if not sample.anomaly and isinstance(raw.get("mask_path"), str) and raw["mask_path"]
            ]
    return DatasetIndex(root=Path(root), splits=splits, dropped_masks=dropped)


def read_index(path: str | Path) -> DatasetIndex:
    """Read a meta.json (or the folder holding it). Root = the folder of the file.

    Raises FileNotFoundError when there is no file and IndexFormatError (a ValueError) when it is malformed.
    """
    file = _index_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no dataset index here (run `vip2clip convert` to create one)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise IndexFormatError(f"{file}: not UTF-8 text ({error.reason})") from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise IndexFormatError(f"{file}: invalid JSON at {where}: {error.msg}") from None
    return parse_index(data, root=file.parent, source=str(file))


def _relative_path(path: str, root: Path, base: Path) -> str:
    """A sample path (relative to `root`, or absolute) rewritten relative to `base`, the folder of the new file.

    Paths outside `base` become (or stay) absolute rather than turn into a chain of `..`: an index refuses paths
    that leave its root (`vip2clip.data.validate`), so an index written beside other data must name it absolutely.
    """
    cleaned = clean_path(path)
    is_absolute = Path(cleaned).is_absolute()
    if not is_absolute and root == base:
        return cleaned
    target = Path(cleaned) if is_absolute else root / cleaned
    relative = Path(os.path.relpath(target, base)).as_posix()
    return Path(os.path.abspath(target)).as_posix() if relative.startswith("..") else relative


def index_to_dict(index: DatasetIndex, base: Path | None = None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The clean JSON form: lower-case splits (train and test always present), paths relative to `base`.

    `base` is the folder the file will live in (default: the index root).
    """
    root = index.root.resolve()
    base = root if base is None else base.resolve()

    def clean(sample: Sample) -> dict[str, Any]:
        mask_path = _relative_path(sample.mask_path, root, base) if sample.mask_path else ""
        return replace(sample, img_path=_relative_path(sample.img_path, root, base), mask_path=mask_path).to_dict()

    ordered = [*SPLITS, *(split for split in index.splits if split not in SPLITS)]
    return {
        split: {cls_name: [clean(sample) for sample in samples] for cls_name, samples in index.splits[split].items()}
        for split in ordered
    }


def write_index(index: DatasetIndex, path: str | Path | None = None) -> Path:
    """Write the index atomically to `path` (a file, or a folder to hold meta.json; default: the index root)."""
    target = Path(path) if path is not None else index.root / INDEX_NAME
    if target.is_dir():
        target = target / INDEX_NAME
    text = json.dumps(index_to_dict(index, base=target.parent), indent=4, ensure_ascii=False) + "\n"
    return atomic_write_text(target, text)
