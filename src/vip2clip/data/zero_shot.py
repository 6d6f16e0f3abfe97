"""Which images a model was trained on, and how many of a test set they are: an honest zero-shot protocol.

A checkpoint records the SHA-256 of every training image (`training_record`: the digests sorted, as 32 raw bytes
each in a uint8 tensor [N, 32]: MVTec AD's 1,725 images take 55 KB). Before a test, the test images are hashed
and counted against that set (`count_overlap`): a model tested on images it was trained on is not zero-shot, and
the results say so ("not zero-shot: N of M test images were training images"). Hashing the bytes finds the same
image under another path or in a copied dataset, which comparing roots would not.

Checkpoints written before this record (or in the authors' release format) carry no digests: their overlap is
unknown and said so (`Overlap.note`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vip2clip.data.index import DatasetIndex
from vip2clip.utils.hashing import file_sha256

RECORD_KEY = "training_images"
UNKNOWN_NOTE = (
    "overlap unknown: the checkpoint does not record its training images (an older vip2clip or the release "
    "format), so whether these test images were among them cannot be checked"
)


def pack_digests(hex_digests: Iterable[str]) -> torch.Tensor:
    """Hex SHA-256 digests -> uint8 [N, 32], sorted and without repeats (a set, stored compactly)."""
    unique = sorted(set(hex_digests))
    if not unique:
        return torch.zeros((0, 32), dtype=torch.uint8)
    return torch.tensor([list(bytes.fromhex(digest)) for digest in unique], dtype=torch.uint8)


def unpack_digests(packed: torch.Tensor) -> set[str]:
    """Inverse of `pack_digests`."""
    return {bytes(row).hex() for row in packed.tolist()}


def training_record(hex_digests: Sequence[str], split: str) -> dict[str, Any]:
    """The checkpoint's record of its training images (meta[RECORD_KEY])."""
    packed = pack_digests(hex_digests)
    return {"sha256": packed, "count": int(packed.shape[0]), "split": split, "hash": "sha256 of the image file"}


def training_digests(meta: Mapping[str, Any]) -> set[str] | None:
    """The training images' digests of a checkpoint's meta; None when it has no record (overlap unknown)."""
    record = meta.get(RECORD_KEY)
    if not isinstance(record, Mapping) or not isinstance(record.get("sha256"), torch.Tensor):
        return None
    return unpack_digests(record["sha256"])


def index_digests(index: DatasetIndex, split: str = "test", classes: Sequence[str] | None = None) -> list[str]:
    """Hex SHA-256 of every image of a split (some classes only when given), in index order."""
    return [file_sha256(index.resolve(sample.img_path)) for sample in index.samples(split, classes)]


@dataclass(frozen=True)
class Overlap:
    """How many of `tested` test images were training images (`shared`); shared is None when unknown."""

    shared: int | None
    tested: int

    @property
    def known(self) -> bool:
        return self.shared is not None

    @property
    def zero_shot(self) -> bool | None:
        return None if self.shared is None else self.shared == 0

    def note(self) -> str | None:
        """The sentence for results files and the terminal; None for a clean zero-shot test."""
        if self.shared is None:
            return UNKNOWN_NOTE
        if self.shared:
            return f"not zero-shot: {self.shared} of {self.tested} test images were training images"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"zero_shot": self.zero_shot, "test_images_in_training": self.shared, "test_images": self.tested}


def count_overlap(test_digests: Sequence[str], trained: set[str] | None) -> Overlap:
    """The overlap of test images (their digests, one per image) with a training set (None: unknown)."""
    if trained is None:
        return Overlap(None, len(test_digests))
    return Overlap(sum(1 for digest in test_digests if digest in trained), len(test_digests))
