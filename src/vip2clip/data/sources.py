"""Several datasets as one training set (the paper's Table 9 protocol: "we train on MVTec AD and CVC-ColonDB").

`merge_sources` joins the chosen split of every source into one `DatasetIndex` whose sample paths are absolute
and whose classes are named "SOURCE/CLASS", so that the training loop sees one stream of images and shuffles them
together (one seeded order over all of them, exactly as it shuffles one dataset). The samples keep the sources'
order (first source first, each in its index order), so training on the merged index equals training on a
meta.json that lists the same images in that order.

Every image is hashed (SHA-256 of its bytes): an image that is also in an earlier source (the same file, or a copy
of it) is counted once, in the first source, and the duplicates are reported. The sources' native image sizes are
read from the file headers; sources of different sizes are reported, since every image is resized to the model's
input size and so changes scale differently per source.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vip2clip.data.images import BadImageError, image_size
from vip2clip.data.index import DatasetIndex, Sample
from vip2clip.utils.hashing import file_sha256

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SourceCount:
    """One source of a training set: its name, root, the images it contributes (normal / anomalous) and the
    images left out because an earlier source holds the same bytes."""

    name: str
    root: str
    normal: int
    anomalous: int
    duplicates: int = 0
    sizes: tuple[str, ...] = ()  # the most common native sizes, "WxH"

    @property
    def images(self) -> int:
        return self.normal + self.anomalous

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": self.root,
            "images": self.images,
            "normal": self.normal,
            "anomalous": self.anomalous,
            "duplicates_dropped": self.duplicates,
            "sizes": list(self.sizes),
        }


@dataclass
class MergedSources:
    """The merged index, the per-source counts and the messages about duplicates and image sizes."""

    index: DatasetIndex
    sources: list[SourceCount]
    messages: list[str] = field(default_factory=list)

    def describe(self) -> list[dict[str, Any]]:
        return [source.to_dict() for source in self.sources]


def source_counts(name: str, index: DatasetIndex, *, split: str) -> SourceCount:
    """The counts of one dataset used alone (no hashing, no size reading)."""
    samples = index.samples(split)
    anomalous = sum(1 for sample in samples if sample.anomaly)
    return SourceCount(name=name, root=str(index.root), normal=len(samples) - anomalous, anomalous=anomalous)


def _absolute(index: DatasetIndex, path: str) -> str:
    return os.path.abspath(index.resolve(path)) if path else ""


def _common_root(indexes: Sequence[DatasetIndex]) -> Path:
    try:
        return Path(os.path.commonpath([str(index.root.resolve()) for index in indexes]))
    except ValueError:  # different drives (Windows)
        return indexes[0].root


def _size_summary(paths: Sequence[str]) -> tuple[str, ...]:
    """The native sizes of the images, most common first (at most three), read from the headers (of the readable
    ones: the dataset's check reports the others)."""
    counts = Counter()
    for path in paths:
        with contextlib.suppress(BadImageError):
            counts["{}x{}".format(*image_size(path))] += 1
    return tuple(size for size, _ in counts.most_common(3))


def merge_sources(sources: Sequence[tuple[str, DatasetIndex]], split: str = "test") -> MergedSources:
    """One index holding the `split` of every (name, index) source, for training on all of them at once.

    Raises ValueError when two sources have the same name or a source has no images in `split`."""
    names = [name for name, _ in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"two training sources have the same name: {names}; name them NAME=ROOT")
    seen: dict[str, str] = {}  # image SHA-256 -> the source that holds it
    merged: list[Sample] = []
    counts, messages = [], []
    for name, index in sources:
        samples = index.samples(split)
        if not samples:
            raise ValueError(f"training source {name} ({index.root}): split {split!r} has no images")
        kept, duplicates = [], Counter()
        for sample in samples:
            image = _absolute(index, sample.img_path)
            # a listed but missing file is kept for the dataset's check, which skips it (--skip-bad) or names it
            digest = file_sha256(image) if Path(image).is_file() else None
            if digest in seen:
                duplicates[seen[digest]] += 1
                continue
            if digest is not None:
                seen[digest] = name
            kept.append(
                replace(
                    sample,
                    img_path=image,
                    mask_path=_absolute(index, sample.mask_path),
                    cls_name=f"{name}/{sample.cls_name}",
                )
            )
        for other, n in duplicates.items():
            where = "itself" if other == name else other
            messages.append(
                f"{n} image(s) of training source {name} are also in {where} (same SHA-256): each is "
                f"counted once, in {other}"
            )
        anomalous = sum(1 for sample in kept if sample.anomaly)
        sizes = _size_summary([sample.img_path for sample in kept])
        counts.append(
            SourceCount(
                name=name,
                root=str(index.root),
                normal=len(kept) - anomalous,
                anomalous=anomalous,
                duplicates=sum(duplicates.values()),
                sizes=sizes,
            )
        )
        merged.extend(kept)
    if len({count.sizes[:1] for count in counts if count.sizes}) > 1:
        listed = "; ".join(f"{count.name}: {', '.join(count.sizes)}" for count in counts)
        messages.append(
            f"the training sources have different image sizes ({listed}); every image is resized to "
            "the model's input size, so the sources' objects change scale differently"
        )
    index = DatasetIndex(_common_root([index for _, index in sources]), {split: {}})
    for sample in merged:
        index.splits[split].setdefault(sample.cls_name, []).append(sample)
    for message in messages:
        logger.warning("%s", message)
    return MergedSources(index, counts, messages)
