"""Which images a model was trained on, and how many of a test set they are: an honest zero-shot protocol.

A checkpoint records the digest of every training image (`training_record`: the digests sorted, as 32 raw bytes
each in a uint8 tensor [N, 32]: MVTec AD's 1,725 images take 55 KB). The digest is `data.images.pixel_digest` of
the decoded picture (the one the reference images' leave-one-out uses), taken while training decodes the images
anyway (the feature cache's build, or the first epoch without a cache). Before a test, the test images are
decoded and counted against that set (`count_overlap`): a model tested on images it was trained on is not
zero-shot, and the results say so ("not zero-shot: N of M test images were training images"). Digesting pixels
finds the same image under another path, in a copied dataset and re-saved losslessly (other file bytes, the same
pixels). It does not find near-duplicates: a re-encoded copy (PNG -> JPEG, resized, cropped) has other pixels.

Checkpoints written before this record (or in the authors' release format) carry no digests: their overlap is
unknown and said so (`Overlap.note`). Checkpoints of vip2clip before issue 27 recorded the SHA-256 of the image
*files*: they are compared with the test files' bytes, which finds byte-identical copies only, so a test set with
none is "overlap unknown" (not zero-shot true), said so. A record of the wrong shape or empty is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vip2clip.data.images import BadImageError, load_image, pixel_digest
from vip2clip.data.index import DatasetIndex
from vip2clip.utils.hashing import file_sha256

RECORD_KEY = "training_images"
PIXELS = "sha256 of the decoded pixels"  # the record's "hash": what a digest is a digest of
BYTES = "sha256 of the image file"  # records of vip2clip before issue 27
COMPARED = {
    PIXELS: "decoded pixels: copies, also re-saved losslessly, are found; re-encoded near-duplicates (PNG -> JPEG, "
    "resized) are not",
    BYTES: "file bytes (a checkpoint of an older vip2clip): only byte-identical copies are found",
}
UNKNOWN_NOTE = (
    "overlap unknown: the checkpoint does not record its training images (an older vip2clip or the release "
    "format), so whether these test images were among them cannot be checked"
)
BYTES_NOTE = (
    "overlap unknown: no test image is a byte-identical copy of a training image, but the checkpoint (an older "
    "vip2clip) records file digests, not pixel digests, so re-saved copies cannot be ruled out; retrain to record them"
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
    """The checkpoint's record of its training images (meta[RECORD_KEY]): their `pixel_digest`s."""
    packed = pack_digests(hex_digests)
    return {"sha256": packed, "count": int(packed.shape[0]), "split": split, "hash": PIXELS}


@dataclass(frozen=True)
class TrainedImages:
    """A checkpoint's training images: their digests and what was digested (PIXELS, or BYTES for older ones)."""

    digests: set[str]
    hashed: str = PIXELS


def training_digests(meta: Mapping[str, Any]) -> TrainedImages | None:
    """The training images of a checkpoint's meta; None when it has no record (overlap unknown). ValueError for
    a record of the wrong shape, empty, or of an unknown kind: the overlap cannot be judged from it."""
    record = meta.get(RECORD_KEY)
    if record is None:
        return None
    packed = record.get("sha256") if isinstance(record, Mapping) else None
    hashed = record.get("hash", BYTES) if isinstance(record, Mapping) else None
    problem = None
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        problem = f"its digests are not a uint8 [N, 32] tensor ({type(packed).__name__})"
    elif packed.shape[1] != 32 or packed.shape[0] == 0:
        problem = f"its digests have the shape {list(packed.shape)}, not [N >= 1, 32]"
    elif record.get("count") != packed.shape[0]:
        problem = f"it counts {record.get('count')} images but holds {packed.shape[0]} digests"
    elif hashed not in COMPARED:
        problem = f"its digests are of an unknown kind ({hashed!r})"
    if problem:
        raise ValueError(f"the checkpoint's record of its training images is damaged: {problem}; cannot tell zero-shot")
    return TrainedImages(unpack_digests(packed), hashed)


def index_digests(
    index: DatasetIndex,
    split: str = "test",
    *,
    classes: Sequence[str] | None = None,
    hashed: str = PIXELS,
    skip_bad: bool = True,
) -> list[str]:
    """The digests (`hashed`: PIXELS, or BYTES to compare with an older checkpoint) of every image of a split (some
    classes only when given), in index order. An image that cannot be read is left out with `skip_bad` (it is
    neither trained nor tested on), else BadImageError (FileNotFoundError for BYTES) names it, before slow work."""
    digests = []
    for sample in index.samples(split, classes):
        path = index.resolve(sample.img_path)
        try:
            digests.append(file_sha256(path) if hashed == BYTES else pixel_digest(load_image(path)))
        except (BadImageError, FileNotFoundError):
            if not skip_bad:
                raise
    return digests


def count_test_overlap(
    trained: TrainedImages | None,
    index: DatasetIndex,
    *,
    split: str = "test",
    classes: Sequence[str] | None = None,
    skip_bad: bool = True,
) -> Overlap:
    """The `Overlap` of a split's images (some classes only when given) with a checkpoint's training images (None:
    unknown, and no image is decoded), compared by what the checkpoint digested (pixels; bytes for an older one)."""
    if trained is None:
        return Overlap(None, len(index.samples(split, classes)))
    digests = index_digests(index, split, classes=classes, hashed=trained.hashed, skip_bad=skip_bad)
    return count_overlap(digests, trained.digests, hashed=trained.hashed)


@dataclass(frozen=True)
class Overlap:
    """How many of `tested` test images were training images (`shared`); shared is None when unknown. `hashed`:
    what was compared (PIXELS; BYTES for an older checkpoint, where no shared image does not mean zero-shot)."""

    shared: int | None
    tested: int
    hashed: str = PIXELS

    @property
    def known(self) -> bool:
        """Whether the test images were counted (a checkpoint with a record)."""
        return self.shared is not None

    @property
    def zero_shot(self) -> bool | None:
        if self.shared is None or (self.hashed == BYTES and not self.shared):
            return None
        return self.shared == 0

    def note(self) -> str | None:
        """The sentence for results files and the terminal; None for a clean zero-shot test."""
        if self.shared is None:
            return UNKNOWN_NOTE
        if self.shared:
            return f"not zero-shot: {self.shared} of {self.tested} test images were training images"
        return BYTES_NOTE if self.hashed == BYTES else None

    def to_dict(self) -> dict[str, Any]:
        compared = None if self.shared is None else COMPARED[self.hashed]
        return {
            "zero_shot": self.zero_shot,
            "test_images_in_training": self.shared,
            "test_images": self.tested,
            "compared": compared,
        }


def count_overlap(test_digests: Sequence[str], trained: set[str] | None, *, hashed: str = PIXELS) -> Overlap:
    """The overlap of test images (their digests of kind `hashed`, one per image) with a training set (None:
    unknown)."""
    if trained is None:
        return Overlap(None, len(test_digests), hashed)
    return Overlap(sum(1 for digest in test_digests if digest in trained), len(test_digests), hashed)
