"""Pixel-level metrics from mergeable statistics: a class's maps reduce to its normal pixels' scores, sorted, and
its defect pixels, which add up over any split of the images (shards on several ranks, batches) to exactly the
statistics of the whole class.

`PixelStats.of(masks, maps)` holds what pixel AUROC, max-F1 and both AUPRO variants need: the normal pixels' scores
in sorted runs (`ScoreRun`), and the defect pixels' scores with their 8-connected region. Every metric needs the
normal pixels only as counts at or below given thresholds (the distinct defect scores, the AUPRO grid), which a
binary search in each run gives, so the runs are never merged into one array of the class.

* float32 / float64 maps (the evaluation's default, float32): exact. A run holds the raw sorted scores, 4 bytes
  per normal pixel of float32 (1.0 GiB for a class of 1,000 images at 518 px), about the memory of the class's
  maps, which the authors' `test.py` holds as float32 too (plus its masks and sklearn's sorted copies).
  `merge` merges runs of similar size (a binary counter: each score is merged O(log batches) times) up to
  `MAX_RUN` scores, so a class has a few runs and a merge needs at most `MAX_RUN` scores of extra memory.
* float16 maps (the `map_dtype="float16"` option): a run is a count per distinct float16 value, a bincount over
  the 65,536 bit patterns: a few hundred kB per class, whatever its size. Rounding to float16 (about 3
  significant digits) makes scores closer than ~5e-4 near 0.5 tie, which changes the metrics of maps with a
  narrow spread (docs/evaluation.md measures by how much).

`PixelStats.merge` of the parts gives the same metric values, bit for bit, as the whole: the metrics use integer
counts and the defect pixels in image order only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from vip2clip.metrics.ranking import Ranking, UndefinedMetric, guarded, pixel_inputs, ranking_auroc, ranking_best_f1
from vip2clip.metrics.threshold import PixelF1Histogram

# 8-connectivity, the regions of `skimage.measure.label` (the community code's labelling).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# The most scores `PixelStats.merge` puts into one run by merging (256 MiB of float32): the extra memory of a merge.
MAX_RUN = 1 << 26
_HISTOGRAM_CHUNK = 1 << 22  # scores turned into float16 keys at a time (the keys' temporaries stay ~30 MB)

_FLOAT16_PATTERNS = np.arange(1 << 16, dtype=np.uint16)
# The 65,536 float16 bit patterns in ascending order of their values (NaN patterns, never counted, anywhere).
with np.errstate(invalid="ignore"):
    _FLOAT16_ASCENDING = _FLOAT16_PATTERNS[np.argsort(PixelF1Histogram.keys(_FLOAT16_PATTERNS.view(np.float16)))]
_NEGATIVE_ZERO = 0x8000


@dataclass(frozen=True)
class ScoreRun:
    """Pixel scores in ascending order: the raw scores (`counts` None: one pixel each, ties repeated), or distinct
    values [U] with their pixel counts [U] int64 (float16 maps)."""

    values: np.ndarray
    counts: np.ndarray | None = None

    @property
    def n_pixels(self) -> int:
        return int(self.values.size if self.counts is None else self.counts.sum())

    def at_or_below(self, thresholds: np.ndarray, strict: bool = False) -> np.ndarray:
        """[T] int64: the pixels with score <= t (< t when `strict`) for each of `thresholds` [T], in the runs' dtype
        (a wider dtype would make numpy copy the run to compare)."""
        index = np.searchsorted(self.values, thresholds, side="left" if strict else "right")
        if self.counts is None:
            return index.astype(np.int64)
        return np.concatenate(([0], np.cumsum(self.counts)))[index]

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreRun:
        """The run of any array of scores: counted per bit pattern for float16 (no sort), else sorted."""
        if scores.dtype != np.float16:
            return cls(np.sort(scores, axis=None))
        counts = np.bincount(scores.view(np.uint16).reshape(-1), minlength=1 << 16)
        counts[0] += counts[_NEGATIVE_ZERO]  # -0 is +0
        counts[_NEGATIVE_ZERO] = 0
        counts = counts[_FLOAT16_ASCENDING]
        present = counts > 0
        return cls(_FLOAT16_ASCENDING[present].view(np.float16), counts[present])

    @staticmethod
    def combined(first: ScoreRun, second: ScoreRun) -> ScoreRun:
        """One run of the scores of both (same kind and dtype)."""
        if first.counts is None:  # numpy's vectorised quicksort beats a merge (timsort) of the two sorted halves
            merged = np.concatenate([first.values, second.values])
            merged.sort()
            return ScoreRun(merged)
        values, inverse = np.unique(np.concatenate([first.values, second.values]), return_inverse=True)
        # float64 weights hold integer counts exactly (below 2**53)
        counts = np.bincount(inverse, weights=np.concatenate([first.counts, second.counts]), minlength=values.size)
        return ScoreRun(values, counts.astype(np.int64))


def _push_run(runs: list[ScoreRun], run: ScoreRun) -> None:
    """Add `run` to `runs`, merging like a binary counter: a few runs of about doubling size, each score merged
    O(log n) times; counted runs (bounded by the 65,536 float16 values) always into one."""
    if run.values.size == 0:
        return
    runs.append(run)
    while len(runs) > 1:
        low, high = runs[-2], runs[-1]
        counted = high.counts is not None
        if not counted and (low.values.size > high.values.size or low.values.size + high.values.size > MAX_RUN):
            break
        runs[-2:] = [ScoreRun.combined(low, high)]


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
    """Sufficient statistics of the pixel metrics of a set of images (see the module docstring).

    normal: the normal pixels' scores, in runs (`ScoreRun`, the maps' dtype). defect_values: [P] the defect pixels'
    scores, image by image in row-major order; defect_regions: [P] their 8-connected region, numbered 1..n_regions
    image by image.
    """

    normal: tuple[ScoreRun, ...]
    defect_values: np.ndarray
    defect_regions: np.ndarray
    n_regions: int

    @property
    def dtype(self) -> np.dtype:
        return self.defect_values.dtype

    @property
    def n_normal(self) -> int:
        return sum(run.n_pixels for run in self.normal)

    @property
    def n_pixels(self) -> int:
        return self.n_normal + self.defect_values.size

    @property
    def nbytes(self) -> int:
        """Memory held by the statistics."""
        arrays = [self.defect_values, self.defect_regions] + [run.values for run in self.normal]
        return sum(a.nbytes for a in arrays) + sum(run.counts.nbytes for run in self.normal if run.counts is not None)

    def extremes(self) -> tuple[np.generic, np.generic]:
        """(lowest, highest) score of all pixels, in the maps' dtype; ValueError without pixels."""
        ends = [run.values[[0, -1]] for run in self.normal]
        if self.defect_values.size:
            ends.append(np.array([self.defect_values.min(), self.defect_values.max()]))
        if not ends:
            raise ValueError("no pixels")
        ends = np.concatenate(ends)
        return ends.min(), ends.max()

    def normal_at_or_below(self, thresholds: np.ndarray, strict: bool = False) -> np.ndarray:
        """[T] int64: the normal pixels with score <= t (< t when `strict`), thresholds [T] in the maps' dtype."""
        thresholds = np.asarray(thresholds, dtype=self.dtype)
        counts = np.zeros(thresholds.shape, dtype=np.int64)
        for run in self.normal:
            counts += run.at_or_below(thresholds, strict)
        return counts

    def f1_histogram(self) -> PixelF1Histogram:
        """The pixels counted per float16 value (`PixelF1Histogram`): equal to `add` on the pixels themselves."""
        histogram = PixelF1Histogram()
        histogram.positive += np.bincount(PixelF1Histogram.keys(self.defect_values), minlength=1 << 16)
        for run in self.normal:
            if run.counts is not None:
                keys = PixelF1Histogram.keys(run.values)
                histogram.negative += np.bincount(keys, weights=run.counts, minlength=1 << 16).astype(np.int64)
                continue
            for start in range(0, run.values.size, _HISTOGRAM_CHUNK):
                # Rounding is monotone, so the sorted run rounds to runs of equal float16 values: count those.
                rounded = run.values[start : start + _HISTOGRAM_CHUNK].astype(np.float16)
                starts = np.flatnonzero(np.concatenate(([True], rounded[1:] != rounded[:-1])))  # -0 == +0
                counts = np.diff(np.append(starts, rounded.size))
                keys = PixelF1Histogram.keys(rounded[starts])
                histogram.negative += np.bincount(keys, weights=counts, minlength=1 << 16).astype(np.int64)
        return histogram

    @classmethod
    def of(cls, masks: ArrayLike, maps: ArrayLike) -> PixelStats:
        """Statistics of masks bool [N, H, W] (or 0/1) and maps float [N, H, W]; ValueError for malformed input."""
        m, a = pixel_inputs(masks, maps)
        regions, n_regions = _defect_region_ids(m)
        normal = ScoreRun.of(a[~m])
        return cls((normal,) if normal.values.size else (), a[m], regions, n_regions)

    @classmethod
    def merge(cls, parts: Iterable[PixelStats]) -> PixelStats:
        """The statistics of the union of disjoint image sets, `parts` in image order (a pure, exact reduction)."""
        accumulator = PixelStatsAccumulator()
        for part in parts:
            accumulator.add(part)
        return accumulator.result()


class PixelStatsAccumulator:
    """`PixelStats.merge` one part at a time (e.g. per batch), so that the parts need not be held: the normal
    runs are merged as they come (at most `MAX_RUN` scores of extra memory), the defect pixels concatenated once."""

    def __init__(self) -> None:
        self._runs: list[ScoreRun] = []
        self._defect_values: list[np.ndarray] = []
        self._defect_regions: list[np.ndarray] = []
        self._n_regions = 0
        self._dtype: np.dtype | None = None

    def add(self, part: PixelStats) -> None:
        if self._dtype is not None and part.dtype != self._dtype:
            raise ValueError(f"cannot merge maps of different dtypes: {sorted({str(self._dtype), str(part.dtype)})}")
        self._dtype = part.dtype
        for run in part.normal:
            _push_run(self._runs, run)
        self._defect_values.append(part.defect_values)
        self._defect_regions.append(part.defect_regions + self._n_regions)
        self._n_regions += part.n_regions

    @property
    def empty(self) -> bool:
        return self._dtype is None

    def result(self) -> PixelStats:
        if self._dtype is None:
            raise ValueError("nothing to merge")
        return PixelStats(
            tuple(self._runs),
            np.concatenate(self._defect_values),
            np.concatenate(self._defect_regions),
            self._n_regions,
        )


@dataclass(frozen=True)
class PixelData:
    """One class's pixels: their statistics and the ranking of the defect pixels' distinct scores."""

    stats: PixelStats
    ranking: Ranking


def pixel_data(stats: PixelStats) -> PixelData:
    """The ranking of `stats` (a `vip2clip.metrics.ranking.Ranking`) with the stats; UndefinedMetric without defect
    or normal pixels."""
    n_pos, n_neg = int(stats.defect_values.size), stats.n_normal
    if n_pos == 0:
        raise UndefinedMetric("no defect pixel in the masks")
    if n_neg == 0:
        raise UndefinedMetric("every pixel is a defect pixel")
    values, counts = np.unique(stats.defect_values, return_counts=True)
    pos_ge = np.cumsum(counts[::-1])[::-1]
    neg_ge = n_neg - stats.normal_at_or_below(values, strict=True)
    neg_gt = n_neg - stats.normal_at_or_below(values)
    ranking = Ranking(values=values, pos_ge=pos_ge, neg_ge=neg_ge, neg_gt=neg_gt, n_pos=n_pos, n_neg=n_neg)
    return PixelData(stats, ranking)


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over all pixels of the class. masks: bool [N, H, W]; maps: float [N, H, W] (float16 accepted)."""
    stats = PixelStats.of(masks, maps)
    return guarded("pixel_auroc", lambda: ranking_auroc(pixel_data(stats).ranking))


def pixel_max_f1(masks: ArrayLike, maps: ArrayLike) -> float:
    """Max F1 over the precision-recall curve of all pixels of the class. masks [N, H, W], maps [N, H, W]."""
    stats = PixelStats.of(masks, maps)
    return guarded("pixel_f1", lambda: ranking_best_f1(pixel_data(stats).ranking)[0])
