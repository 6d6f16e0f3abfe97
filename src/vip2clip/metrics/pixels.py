"""Pixel-level metrics from mergeable statistics: a class's maps reduce to counts per distinct score and its defect
pixels, which add up over any split of the images (shards on several ranks, batches) to exactly the statistics of
the whole class.

`PixelStats.of(masks, maps)` holds what pixel AUROC, max-F1 and both AUPRO variants need: the number of defect and
of normal pixels at every distinct score, and the defect pixels' scores with their 8-connected region. For float16
maps (the evaluation's default) the counts are a bincount over the 65,536 float16 values instead of a sort of every
pixel; for other dtypes they come from `np.unique`. Every metric then uses only these integers and the defect
pixels in image order, so `PixelStats.merge` of the parts gives the same metric values, bit for bit, as the whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from vip2clip.metrics.ranking import Ranking, UndefinedMetric, guarded, pixel_inputs, ranking_auroc, ranking_best_f1
from vip2clip.metrics.threshold import PixelF1Histogram

# 8-connectivity, the regions of `skimage.measure.label` (the community code's labelling).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


_FLOAT16_PATTERNS = np.arange(1 << 16, dtype=np.uint16)
# The 65,536 float16 bit patterns in ascending order of their values (NaN patterns, never counted, anywhere).
with np.errstate(invalid="ignore"):
    _FLOAT16_ASCENDING = _FLOAT16_PATTERNS[np.argsort(PixelF1Histogram.keys(_FLOAT16_PATTERNS.view(np.float16)))]
_NEGATIVE_ZERO = 0x8000


def _value_counts(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values [U] ascending, defect pixels [U], normal pixels [U]) of maps [N, H, W] under masks."""
    if maps.dtype == np.float16:  # count the bit patterns: no sort of the pixels
        bits = maps.view(np.uint16)
        total = np.bincount(bits.reshape(-1), minlength=1 << 16)
        positive = np.bincount(bits[masks], minlength=1 << 16)
        for counts in (total, positive):  # -0 is +0
            counts[0] += counts[_NEGATIVE_ZERO]
            counts[_NEGATIVE_ZERO] = 0
        total, positive = total[_FLOAT16_ASCENDING], positive[_FLOAT16_ASCENDING]
        present = total > 0
        values = _FLOAT16_ASCENDING[present].view(np.float16)
        return values, positive[present], (total - positive)[present]
    values, total = np.unique(maps, return_counts=True)
    defect_values, defect_counts = np.unique(maps[masks], return_counts=True)
    positive = np.zeros(values.size, dtype=np.int64)
    positive[np.searchsorted(values, defect_values)] = defect_counts
    return values, positive, total - positive


def _defect_region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Region id (1..R, unique over the images) of every defect pixel in `masks[masks]` order, and R.

    Labelled image by image: one int32 label image at a time instead of one for the whole [N, H, W] stack
    (1 GB for 1,000 images of 518 x 518).
    """
    ids, offset = [], 0
    for mask in masks:
        if mask.any():
            regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
            ids.append(regions[mask] + offset)
            offset += count
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), offset


@dataclass(frozen=True)
class PixelStats:
    """Sufficient statistics of the pixel metrics of a set of images.

    values: [U] the distinct scores, ascending, in the maps' dtype; positive / negative: [U] int64, the number of
    defect / normal pixels with that score. defect_values: [P] the defect pixels' scores, image by image in
    row-major order; defect_regions: [P] their 8-connected region, numbered 1..n_regions image by image.
    """

    values: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    defect_values: np.ndarray
    defect_regions: np.ndarray
    n_regions: int

    @classmethod
    def of(cls, masks: ArrayLike, maps: ArrayLike) -> PixelStats:
        """Statistics of masks bool [N, H, W] (or 0/1) and maps float [N, H, W]; ValueError for malformed input."""
        m, a = pixel_inputs(masks, maps)
        values, positive, negative = _value_counts(m, a)
        regions, n_regions = _defect_region_ids(m)
        return cls(values, positive, negative, a[m], regions, n_regions)

    @classmethod
    def merge(cls, parts: Sequence[PixelStats]) -> PixelStats:
        """The statistics of the union of disjoint image sets, `parts` in image order (a pure, exact reduction)."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        if len({part.values.dtype for part in parts}) > 1:
            raise ValueError(f"cannot merge maps of different dtypes: {sorted({str(p.values.dtype) for p in parts})}")
        if len(parts) == 1:
            return parts[0]
        values, inverse = np.unique(np.concatenate([part.values for part in parts]), return_inverse=True)

        def summed(name: str) -> np.ndarray:  # float64 weights hold integer counts exactly (below 2**53)
            weights = np.concatenate([getattr(part, name) for part in parts])
            return np.bincount(inverse, weights=weights, minlength=values.size).astype(np.int64)

        offsets = np.cumsum([0] + [part.n_regions for part in parts])
        regions = [part.defect_regions + offset for part, offset in zip(parts, offsets, strict=False)]
        return cls(
            values,
            summed("positive"),
            summed("negative"),
            np.concatenate([part.defect_values for part in parts]),
            np.concatenate(regions),
            int(offsets[-1]),
        )


@dataclass(frozen=True)
class PixelData:
    """One class's pixels: their statistics and the ranking of the defect pixels' distinct scores."""

    stats: PixelStats
    ranking: Ranking


def pixel_data(stats: PixelStats) -> PixelData:
    """The ranking of `stats` (a `vip2clip.metrics.ranking.Ranking`) with the stats; UndefinedMetric without defect
    or normal pixels."""
    n_pos, n_neg = int(stats.positive.sum()), int(stats.negative.sum())
    if n_pos == 0:
        raise UndefinedMetric("no defect pixel in the masks")
    if n_neg == 0:
        raise UndefinedMetric("every pixel is a defect pixel")
    has_defect = stats.positive > 0
    pos_ge = np.cumsum(stats.positive[::-1])[::-1]
    neg_ge = np.cumsum(stats.negative[::-1])[::-1]
    neg_gt = neg_ge - stats.negative
    ranking = Ranking(stats.values[has_defect], pos_ge[has_defect], neg_ge[has_defect], neg_gt[has_defect],
                       n_pos, n_neg)  # fmt: skip
    return PixelData(stats, ranking)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over all pixels of the class. masks: bool [N, H, W]; maps: float [N, H, W] (float16 accepted)."""
    stats = PixelStats.of(masks, maps)
    return guarded("pixel_auroc", lambda: ranking_auroc(pixel_data(stats).ranking))


def pixel_max_f1(masks: ArrayLike, maps: ArrayLike) -> float:
    """Max F1 over the precision-recall curve of all pixels of the class. masks [N, H, W], maps [N, H, W]."""
    stats = PixelStats.of(masks, maps)
    return guarded("pixel_f1", lambda: ranking_best_f1(pixel_data(stats).ranking)[0])
