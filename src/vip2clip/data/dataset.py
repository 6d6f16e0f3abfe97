"""A torch Dataset over one split of a DatasetIndex: preprocessed images, masks and labels.

Bad files are handled in two stages, so that a long run fails (or drops the file) before training starts:

1. At construction `check()` opens every image and mask *header* (`image_size`, no pixel decoding; about a
   millisecond per file): a missing or unreadable file, a missing mask, or a mask whose size differs from its
   image's is found here. By default the first problem raises BadImageError naming the file; with
   `skip_bad=True` every bad sample is dropped and listed in `dataset.skipped` as (path, reason).
2. A file whose header is fine but whose pixels are not (a truncated PNG) only fails when decoded in
   `__getitem__`. By default that raises BadImageError naming the file; with `skip_bad=True` the item comes back
   as None, is recorded in `dataset.skipped` (in the process that loaded it: with DataLoader workers that is
   the worker's copy) and `collate_items` drops it from the batch.

Grayscale, palette, RGBA and 16-bit images are converted to 8-bit RGB by `load_image`.
An anomalous sample without a mask gets an all-zero mask, like a normal one (the label still says anomalous).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vip2clip.data.images import BadImageError, check_mask_size, image_size, load_image, load_mask, pixel_digest
from vip2clip.data.index import DatasetIndex, Sample
from vip2clip.data.transforms import preprocess, preprocess_mask

Item = dict[str, Any]


class AnomalyDataset(Dataset):
    """Samples of one split (optionally some classes only) as model-ready tensors.

    Item: {"image": float [3, S, S] (normalised), "pixels": the image's `pixel_digest`, "mask": float [S, S] of 0/1,
    "label": int (1 = anomalous), "cls_name": str, "path": str (absolute image path), "index": int (position in
    this dataset)}.
    """

    def __init__(
        self,
        index: DatasetIndex,
        split: str = "test",
        *,
        classes: Sequence[str] | None = None,
        image_size: int = 518,
        skip_bad: bool = False,
    ) -> None:
        self.index = index
        self.split = split
        self.image_size = image_size
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.samples: list[Sample] = self.check(index.samples(split, classes))

    def paths(self, sample: Sample) -> tuple[str, str | None]:
        """Absolute (image path, mask path or None) of a sample."""
        image_path = os.path.abspath(self.index.resolve(sample.img_path))
        mask_path = os.path.abspath(self.index.resolve(sample.mask_path)) if sample.mask_path else None
        return image_path, mask_path

    def _header_problem(self, sample: Sample) -> BadImageError | None:
        """The first problem visible from the file headers of a sample, or None."""
        image_path, mask_path = self.paths(sample)
        try:
            image_size(image_path)
            if mask_path is not None:
                check_mask_size(image_path, mask_path)
        except BadImageError as error:
            return error
        return None

    def check(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples whose headers are valid; raises BadImageError on the first bad one unless skip_bad."""
        kept = []
        for sample in samples:
            problem = self._header_problem(sample)
            if problem is None:
                kept.append(sample)
            elif self.skip_bad:
                self.skipped.append((str(problem.path), problem.problem))
            else:
                raise problem
        return kept

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Image labels in dataset order (0 normal, 1 anomalous)."""
        return [sample.anomaly for sample in self.samples]

    def load(self, i: int) -> Item:
        """Decode sample i; raises BadImageError (naming the file) when its pixels cannot be read."""
        sample = self.samples[i]
        image_path, _ = self.paths(sample)
        image = load_image(image_path)
        return {
            "image": preprocess(image, self.image_size),
            "pixels": pixel_digest(image),  # what a checkpoint records of its training images (`data.zero_shot`)
            "mask": self.mask(i),
            "label": int(sample.anomaly),
            "cls_name": sample.cls_name,
            "path": image_path,
            "index": i,
        }

    def mask(self, i: int) -> torch.Tensor:
        """Sample i's mask [S, S] of 0/1 (all zero without a mask file); BadImageError when it cannot be read."""
        _, mask_path = self.paths(self.samples[i])
        if mask_path is None:
            return torch.zeros(self.image_size, self.image_size)
        return preprocess_mask(np.asarray(load_mask(mask_path)), self.image_size)

    def __getitem__(self, i: int) -> Item | None:
        try:
            return self.load(i)
        except BadImageError as error:
            if not self.skip_bad:
                raise
            self.skipped.append((str(error.path), error.problem))
            return None


def collate_items(items: Sequence[Item | None]) -> dict[str, Any] | None:
    """DataLoader collate: drop None (skipped) items and stack the rest; None when nothing is left.

    Batch: {"image": [B, 3, S, S], "pixels": list[str], "mask": [B, S, S], "label": long [B], "cls_name": list[str],
    "path": list[str], "index": long [B]}.
    """
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return {
        "image": torch.stack([item["image"] for item in kept]),
        "pixels": [item["pixels"] for item in kept],
        "mask": torch.stack([item["mask"] for item in kept]),
        "label": torch.tensor([item["label"] for item in kept], dtype=torch.long),
        "cls_name": [item["cls_name"] for item in kept],
        "path": [item["path"] for item in kept],
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
    }
