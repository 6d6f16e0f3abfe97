"""Decision thresholds from data: the F1-optimal pixel threshold over any number of maps, and high quantiles
of normal scores, both in bounded memory (pure numpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_IMAGE_QUANTILE = 0.99
DEFAULT_PIXEL_QUANTILE = 0.999


class PixelF1Histogram:
    """Exact max-F1 threshold over float16 pixel scores of any number of images, in O(65,536) memory.

    Each float16 value maps to a 16-bit key that sorts like the value; counting defect and normal pixels per
    key gives every threshold's true and false positives ("score >= threshold" is a defect).
    """

    def __init__(self) -> None:
        self.positive = np.zeros(1 << 16, dtype=np.int64)
        self.negative = np.zeros(1 << 16, dtype=np.int64)

    @staticmethod
    def keys(values: np.ndarray) -> np.ndarray:
        """float [...] -> uint16 keys [...] in the order of the float16-rounded values (-0 counts as +0)."""
        bits = (np.asarray(values, dtype=np.float16) + np.float16(0)).view(np.uint16)
        return np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.uint16)

    @staticmethod
    def value(key: int) -> float:
        bits = key ^ 0x8000 if key & 0x8000 else ~key & 0xFFFF
        return float(np.array(bits, dtype=np.uint16).view(np.float16))

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """maps float [B, H, W], masks bool [B, H, W] (call per batch: the keys are counted as int64)."""
        keys = self.keys(maps)
        self.positive += np.bincount(keys[masks], minlength=1 << 16)
        self.negative += np.bincount(keys[~masks], minlength=1 << 16)

    @classmethod
    def from_counts(cls, values: np.ndarray, *, positive: np.ndarray, negative: np.ndarray) -> PixelF1Histogram:
        """The histogram of pixels given as counts per distinct value (values [U], defect and normal pixels [U],
        e.g. a `PixelStats`): equal to `add` on the pixels themselves, which round to the same float16 keys."""
        histogram = cls()
        keys = cls.keys(values)
        for counts, target in ((positive, histogram.positive), (negative, histogram.negative)):
            # float64 weights hold integer counts exactly (below 2**53)
            target += np.bincount(keys, weights=counts, minlength=1 << 16).astype(np.int64)
        return histogram

    def merge(self, other: PixelF1Histogram) -> None:
        self.positive += other.positive
        self.negative += other.negative

    def best(self) -> tuple[float, float]:
        """(max F1, threshold); (NaN, NaN) without defect pixels or without normal pixels."""
        n_pos, n_neg = int(self.positive.sum()), int(self.negative.sum())
        if n_pos == 0 or n_neg == 0:
            return math.nan, math.nan
        tp = np.cumsum(self.positive[::-1])[::-1]
        fp = np.cumsum(self.negative[::-1])[::-1]
        f1 = np.where(self.positive > 0, 2.0 * tp / (tp + fp + n_pos), -1.0)
        best = int(np.argmax(f1))
        return float(f1[best]), self.value(best)


class StreamingQuantile:
    """Exact high quantile of a stream of values in O((1 - q) * max_count) memory.

    Only the largest values can be the q-quantile, so with the total count bounded by `max_count` in advance
    (e.g. number of images x pixels per map) it suffices to keep the top `keep` values seen so far. The result
    equals `np.quantile(all_values, q)` (linear interpolation) up to float rounding.
    """

    def __init__(self, q: float, max_count: int) -> None:
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.q = q
        self.max_count = max_count
        # Linear interpolation reads ascending positions floor(q(N-1)) and the next: the top N - floor(q(N-1))
        # values, a count that never decreases with N, so the bound for max_count covers every N <= max_count.
        self.keep = max_count - math.floor(q * (max_count - 1)) + 1
        self.count = 0
        self._top = np.empty(0, dtype=np.float64)

    def add(self, values: np.ndarray) -> None:
        """Add any array of values (flattened)."""
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(flat).all():
            raise ValueError("scores contain NaN or infinite values; cannot calibrate")
        self.count += flat.size
        if self.count > self.max_count:
            raise ValueError(f"more values ({self.count}) than the announced max_count {self.max_count}")
        merged = np.concatenate([self._top, flat])
        if merged.size > self.keep:
            merged = np.partition(merged, merged.size - self.keep)[merged.size - self.keep :]
        self._top = merged

    def merge(self, other: StreamingQuantile) -> None:
        """Add everything `other` (same q and max_count) has seen, exactly as if its values had been added here:
        the top values of a union are among the top values of its parts."""
        if (other.q, other.max_count) != (self.q, self.max_count):
            raise ValueError("can only merge streams with the same quantile and max_count")
        self.count += other.count
        if self.count > self.max_count:
            raise ValueError(f"more values ({self.count}) than the announced max_count {self.max_count}")
        merged = np.concatenate([self._top, other._top])
        if merged.size > self.keep:
            merged = np.partition(merged, merged.size - self.keep)[merged.size - self.keep :]
        self._top = merged

    def value(self) -> float:
        """The q-quantile of everything added so far."""
        if self.count == 0:
            raise ValueError("no pixel scores to calibrate on")
        top = np.sort(self._top)
        offset = self.count - top.size  # ascending index i of the full stream is top[i - offset]
        position = self.q * (self.count - 1)
        low = math.floor(position)
        high = min(low + 1, self.count - 1)
        a, b = top[low - offset], top[high - offset]
        return float(a + (b - a) * (position - low))


def normal_quantile_thresholds(
    image_scores: Sequence[float] | np.ndarray,
    pixel_scores: Sequence[np.ndarray] | np.ndarray | StreamingQuantile,
    *,
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
) -> tuple[float, float]:
    """(image threshold, pixel threshold) from normal images only (pure function).

    image_scores: [N] image scores of N normal images.
    pixel_scores: their anomaly maps (a sequence of arrays of any shapes, or one array, e.g. [N, H, W]);
        all values are pooled. Or a `StreamingQuantile` already fed with the maps (bounded memory); its own
        quantile is then used and `pixel_quantile` is ignored.
    The thresholds are the linear-interpolation quantiles (numpy's default) of the two pools.
    """
    for name, q in (("image_quantile", image_quantile), ("pixel_quantile", pixel_quantile)):
        if not 0.0 < q <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {q}")
    scores = np.asarray(image_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("no normal images to calibrate on")
    if not np.isfinite(scores).all():
        raise ValueError("image scores contain NaN or infinite values; cannot calibrate")
    if isinstance(pixel_scores, StreamingQuantile):
        return float(np.quantile(scores, image_quantile)), pixel_scores.value()
    maps = [pixel_scores] if isinstance(pixel_scores, np.ndarray) else list(pixel_scores)
    stream = StreamingQuantile(pixel_quantile, max(1, sum(int(np.size(m)) for m in maps)))
    for anomaly_map in maps:
        stream.add(anomaly_map)
    return float(np.quantile(scores, image_quantile)), stream.value()
