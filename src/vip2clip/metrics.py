"""Evaluation metrics of the community zero-shot anomaly-detection protocol (paper Sec. 4, Tables 1-2).

Image level: AUROC, average precision (AP) and max-F1 of the image scores. Pixel level, over all pixels of a
class: AUROC, max-F1 and AUPRO, the area under the per-region-overlap (PRO) curve up to FPR 0.3, in two variants:

* ``cflow`` (default): the procedure of the authors' release and AnomalyCLIP (after cflow-ad). 200 thresholds
  ``np.arange(min, max, (max - min) / 200)`` over the class's maps; a pixel is positive when ``map > threshold``;
  PRO = mean over every 8-connected ground-truth region of the fraction of its pixels that are positive; FPR over
  all normal pixels; the points with ``FPR < 0.3`` are kept, their FPRs rescaled to [0, 1] by their own min and
  max, and the trapezoidal area returned.
* ``exact``: MVTec AD's definition. The exact PRO-vs-FPR curve over every distinct threshold, integrated from
  FPR 0 to 0.3 (linear interpolation at the limit) and divided by 0.3.

Speed: no metric loops over thresholds. A curve can only gain a positive at a score that some positive sample
(anomalous image, defect pixel) has, so everything is derived from counts at the distinct positive scores, ranked
by binary search against one sorted copy of all scores. For 100 maps of 518x518 this is one sort of 26.8 M values
instead of 200 passes over them.

Undefined metrics (one label only, no defect pixel, constant maps) return NaN with an `UndefinedMetricWarning`
naming the metric; malformed input raises ValueError.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1")
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_f1")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS
AUPRO_VARIANTS = ("cflow", "exact")

# 8-connectivity, the regions of `skimage.measure.label` (the community code's labelling).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (for example only one label is present); it is returned as NaN."""


class _Undefined(Exception):
    """Internal signal: the metric is undefined; the message says why."""


def _warn_undefined(metric: str, reason: str) -> float:
    # Point the warning at the first frame outside this module, however deep the call came from.
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", UndefinedMetricWarning, stacklevel=level)
    return math.nan


def _guarded(metric: str, compute: Callable[[], float]) -> float:
    """`compute()`, or NaN with a warning naming `metric` when it is undefined."""
    try:
        return compute()
    except _Undefined as undefined:
        return _warn_undefined(metric, str(undefined))


# ----------------------------------------------------------------------------------------------- input checks


def _as_scores(values: ArrayLike, name: str) -> np.ndarray:
    """Finite float16/32/64 array (other real dtypes become float64). float16 is kept: sorting it is cheap."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.dtype not in (np.float16, np.float32, np.float64):
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _as_binary(values: ArrayLike, name: str) -> np.ndarray:
    """Bool array from bool or 0/1 numbers; anything else (e.g. 0/255 masks) is an error, not a guess."""
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf" or not ((array == 0) | (array == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 or boolean values (dtype {array.dtype})")
    return array != 0


def _image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked labels (bool [N]) and scores (float [N])."""
    y, s = _as_binary(labels, "labels"), _as_scores(scores, "scores")
    if y.ndim != 1 or s.shape != y.shape or y.size == 0:
        raise ValueError(f"labels and scores must be non-empty 1-D arrays of equal length, got {y.shape} and {s.shape}")
    return y, s


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked masks (bool [N, H, W]) and maps (float [N, H, W])."""
    m, a = _as_binary(masks, "masks"), _as_scores(maps, "maps")
    if m.ndim != 3 or a.shape != m.shape or m.size == 0:
        raise ValueError(
            f"masks and maps must be non-empty [N, H, W] arrays of equal shape, got {m.shape} and {a.shape}"
        )
    return m, a


# ---------------------------------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class _Ranking:
    """Counts at each distinct positive score v (the thresholds where a curve gains positives), ascending.

    values: [U] the distinct scores of the positive samples; pos_ge, neg_ge, neg_gt: [U] int64, the number of
    positive samples with score >= v and of negative samples with score >= v and > v.
    """

    values: np.ndarray
    pos_ge: np.ndarray
    neg_ge: np.ndarray
    neg_gt: np.ndarray
    n_pos: int
    n_neg: int


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values in a sorted array [U]."""
    return np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))


def _rank(pos_sorted: np.ndarray, all_sorted: np.ndarray) -> _Ranking:
    """Ranking of the positives' scores [P] among all scores [M], both sorted ascending, same dtype."""
    n_pos, n_all = pos_sorted.size, all_sorted.size
    starts = _run_starts(pos_sorted)
    values = pos_sorted[starts]
    pos_ge = n_pos - starts
    pos_gt = np.append(pos_ge[1:], 0)
    all_ge = n_all - np.searchsorted(all_sorted, values, side="left")
    all_gt = n_all - np.searchsorted(all_sorted, values, side="right")
    return _Ranking(values, pos_ge, all_ge - pos_ge, all_gt - pos_gt, n_pos, n_all - n_pos)


def _auroc(r: _Ranking) -> float:
    """Mann-Whitney form of the ROC area: P(score_pos > score_neg) + P(tie) / 2, equal to sklearn's trapezoid."""
    pos_at = r.pos_ge - np.append(r.pos_ge[1:], 0)
    neg_below = r.n_neg - r.neg_ge
    neg_at = r.neg_ge - r.neg_gt
    return float(np.dot(pos_at, neg_below + 0.5 * neg_at) / (r.n_pos * r.n_neg))


def _average_precision(r: _Ranking) -> float:
    """sklearn's AP, sum of (recall step) x precision; recall only steps at positive scores."""
    pos_at = r.pos_ge - np.append(r.pos_ge[1:], 0)
    return float(np.sum(pos_at / r.n_pos * (r.pos_ge / (r.pos_ge + r.neg_ge))))


def _best_f1(r: _Ranking) -> tuple[float, float]:
    """(max F1, its threshold) with "score >= threshold" as positive.

    F1 = 2PR / (P + R) = 2 tp / (tp + fp + n_pos). For a fixed tp the best threshold is the highest one, a
    positive score, so these thresholds are all that sklearn's curve could add. Ties go to the lowest threshold,
    like `thresholds[argmax(f1)]` over sklearn's ascending thresholds.
    """
    f1 = 2.0 * r.pos_ge / (r.pos_ge + r.neg_ge + r.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(r.values[best])


# ------------------------------------------------------------------------------------------------ image level


def _image_ranking(labels: ArrayLike, scores: ArrayLike) -> _Ranking:
    y, s = _image_inputs(labels, scores)
    n_pos = int(y.sum())
    if n_pos in (0, y.size):
        raise _Undefined(f"all {y.size} image labels are {int(y[0])}")
    return _rank(np.sort(s[y]), np.sort(s))


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC. labels: int {0, 1} [N] (1 = anomalous); scores: float [N]."""
    return _guarded("image_auroc", lambda: _auroc(_image_ranking(labels, scores)))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level average precision (sklearn's `average_precision_score`). labels [N], scores [N]."""
    return _guarded("image_ap", lambda: _average_precision(_image_ranking(labels, scores)))


def max_f1(labels: ArrayLike, scores: ArrayLike) -> float:
    """Max F1 over the precision-recall curve (0/0 counts as 0). labels [N], scores [N]."""
    return best_f1_threshold(labels, scores)[0]


def best_f1_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """(max F1, threshold): predicting "anomalous" for score >= threshold reaches that F1. (NaN, NaN) if undefined."""
    try:
        return _best_f1(_image_ranking(labels, scores))
    except _Undefined as undefined:
        nan = _warn_undefined("max_f1", str(undefined))
        return nan, nan


# ------------------------------------------------------------------------------------------------ pixel level


@dataclass(frozen=True)
class _PixelData:
    """One class's pixels: masks bool [N, H, W], maps float [N, H, W], all_sorted [N*H*W], pos_sorted [P]."""

    masks: np.ndarray
    maps: np.ndarray
    all_sorted: np.ndarray
    pos_sorted: np.ndarray
    ranking: _Ranking


def _pixel_data(masks: ArrayLike, maps: ArrayLike) -> _PixelData:
    m, a = _pixel_inputs(masks, maps)
    pos_sorted = np.sort(a[m])
    if pos_sorted.size == 0:
        raise _Undefined("no defect pixel in the masks")
    if pos_sorted.size == a.size:
        raise _Undefined("every pixel is a defect pixel")
    all_sorted = np.sort(a, axis=None)
    return _PixelData(m, a, all_sorted, pos_sorted, _rank(pos_sorted, all_sorted))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over all pixels of the class. masks: bool [N, H, W]; maps: float [N, H, W] (float16 accepted)."""
    return _guarded("pixel_auroc", lambda: _auroc(_pixel_data(masks, maps).ranking))


def pixel_max_f1(masks: ArrayLike, maps: ArrayLike) -> float:
    """Max F1 over the precision-recall curve of all pixels of the class. masks [N, H, W], maps [N, H, W]."""
    return _guarded("pixel_f1", lambda: _best_f1(_pixel_data(masks, maps).ranking)[0])


def _pro_at_values(data: _PixelData) -> np.ndarray:
    """PRO with threshold "score >= v" at each distinct defect score v of the ranking [U].

    Each defect pixel carries weight 1 / (regions x its region's size), so the weights above a threshold sum to
    the mean over regions of the fraction of the region above it.
    """
    region_of_pixel, n_regions = _defect_region_ids(data.masks)
    weight = 1.0 / (n_regions * np.bincount(region_of_pixel)[region_of_pixel])
    value_index = np.searchsorted(data.ranking.values, data.maps[data.masks])
    mass = np.bincount(value_index, weights=weight, minlength=data.ranking.values.size)
    # Rounding in the running sum could push the top a hair over 1, as MVTec's code also notes.
    return np.minimum(np.cumsum(mass[::-1])[::-1], 1.0)


def _defect_region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Region id (1..R, unique over the class) of every defect pixel in `masks[masks]` order, and R.

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


def _floor_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest number of `dtype` <= each of `values` [T]. For x of that dtype: x > v exactly when x > floor(v).

    This lets float64 thresholds be searched in float16/32 arrays without a float64 copy of the arrays.
    """
    floored = values.astype(dtype)
    above = floored.astype(np.float64) > values
    floored[above] = np.nextafter(floored[above], dtype.type(-np.inf))
    return floored


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _aupro_cflow(data: _PixelData, fpr_limit: float, num_thresholds: int) -> float:
    """The community loop's AUPRO, computed at all its thresholds at once (see the module docstring)."""
    r = data.ranking
    lowest, highest = data.all_sorted[0], data.all_sorted[-1]
    # Built exactly like the loop (min, max and step in the maps' dtype, np.arange with a step), so the thresholds
    # and hence the score match it, also for float16 maps.
    step = (highest - lowest) / num_thresholds
    if not step > 0:
        raise _Undefined(f"the maps are constant (or too narrow for {num_thresholds} {data.maps.dtype} steps)")
    grid = _floor_to_dtype(np.arange(lowest, highest, step), data.all_sorted.dtype)
    all_above = data.all_sorted.size - np.searchsorted(data.all_sorted, grid, side="right")
    pos_above = r.n_pos - np.searchsorted(data.pos_sorted, grid, side="right")
    fpr = (all_above - pos_above) / r.n_neg
    pro = np.append(_pro_at_values(data), 0.0)[np.searchsorted(r.values, grid, side="right")]
    keep = fpr < fpr_limit
    if not keep.any():
        raise _Undefined(f"no threshold has a pixel FPR below {fpr_limit}")
    fpr, pro = fpr[keep], pro[keep]
    span = fpr.max() - fpr.min()
    if span == 0:
        # The loop divides 0 by 0 here (NaN). The kept points lie on one vertical line, e.g. a perfect map whose
        # normal pixels all hold the minimum; the curve then reaches its highest PRO at that FPR, so return that.
        return float(pro.max())
    # Thresholds ascend so the rescaled FPRs descend; sklearn's `auc` integrates such x with the sign flipped.
    return _trapezoid((fpr[::-1] - fpr.min()) / span, pro[::-1])


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the polyline (x, y) for x in [0, limit]; x [K] non-decreasing from x[0] = 0."""
    inside = int(np.searchsorted(x, limit, side="right"))
    area = _trapezoid(x[:inside], y[:inside])
    last = inside - 1
    if inside < x.size and x[last] < limit:
        # The segment that crosses the limit is cut there by linear interpolation.
        y_limit = y[last] + (y[inside] - y[last]) * (limit - x[last]) / (x[inside] - x[last])
        area += (limit - x[last]) * (y[last] + y_limit) / 2.0
    return area


def _aupro_exact(data: _PixelData, fpr_limit: float) -> float:
    """MVTec's AUPRO: exact PRO-vs-FPR curve, area up to `fpr_limit` divided by it."""
    r = data.ranking
    pro_ge = _pro_at_values(data)
    pro_gt = np.append(pro_ge[1:], 0.0)
    # With descending thresholds, each distinct defect score v adds two points: just above v (the normal pixels
    # between v and the next defect score have passed, at constant PRO) and at v (ties pass together, a diagonal).
    # Intermediate thresholds only add collinear points on the horizontal stretches, so they are not needed.
    fpr = np.stack([r.neg_gt, r.neg_ge], axis=1)[::-1].ravel() / r.n_neg
    pro = np.stack([pro_gt, pro_ge], axis=1)[::-1].ravel()
    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _aupro(data: _PixelData, variant: str, fpr_limit: float, num_thresholds: int) -> float:
    if variant == "cflow":
        return _aupro_cflow(data, fpr_limit, num_thresholds)
    return _aupro_exact(data, fpr_limit)


def _check_aupro_options(variant: str, fpr_limit: float, num_thresholds: int) -> None:
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"unknown AUPRO variant {variant!r}; valid variants: {', '.join(AUPRO_VARIANTS)}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if int(num_thresholds) != num_thresholds or num_thresholds < 1:
        raise ValueError(f"num_thresholds must be a positive integer, got {num_thresholds}")


def aupro(
    masks: ArrayLike, maps: ArrayLike, variant: str = "cflow", fpr_limit: float = 0.3, num_thresholds: int = 200
) -> float:
    """Area under the PRO curve up to `fpr_limit`, in [0, 1]. masks bool [N, H, W]; maps float [N, H, W].

    variant "cflow": the release's 200-threshold procedure (`num_thresholds` applies only to it); "exact": MVTec's.
    NaN with a warning for a class without defect pixels, and for "cflow" also for constant maps.
    """
    _check_aupro_options(variant, fpr_limit, num_thresholds)
    return _guarded("pixel_aupro", lambda: _aupro(_pixel_data(masks, maps), variant, fpr_limit, int(num_thresholds)))


# ------------------------------------------------------------------------------------------------------ all six


def _image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    try:
        ranking = _image_ranking(labels, scores)
    except _Undefined as undefined:
        return {key: _warn_undefined(key, str(undefined)) for key in IMAGE_KEYS}
    return {
        "image_auroc": _auroc(ranking),
        "image_ap": _average_precision(ranking),
        "image_f1": _best_f1(ranking)[0],
    }


def _pixel_metrics(masks: ArrayLike, maps: ArrayLike) -> dict[str, float]:
    try:
        data = _pixel_data(masks, maps)
    except _Undefined as undefined:
        return {key: _warn_undefined(key, str(undefined)) for key in PIXEL_KEYS}
    return {
        "pixel_auroc": _auroc(data.ranking),
        "pixel_aupro": _guarded("pixel_aupro", lambda: _aupro_cflow(data, 0.3, 200)),
        "pixel_f1": _best_f1(data.ranking)[0],
    }


def compute_all(
    labels: ArrayLike | None, scores: ArrayLike | None, masks: ArrayLike | None = None, maps: ArrayLike | None = None
) -> dict[str, float]:
    """The six metrics of one class as fractions in [0, 1], keyed by `METRIC_KEYS`.

    labels int {0, 1} [N] and scores float [N]; masks bool [N, H, W] and maps float [N, H, W] (float16 accepted).
    Pass `masks=maps=None` for image-level-only data (pixel keys NaN, no warning) and `labels=scores=None` for
    pixel-only data; single-label image data (e.g. all anomalous) gives NaN image keys with warnings.

    >>> m = compute_all([0, 1], [0.2, 0.9], [[[0, 0]], [[0, 1]]], [[[0.1, 0.3]], [[0.2, 0.8]]])
    >>> m["image_auroc"], m["pixel_auroc"], m["pixel_f1"]
    (1.0, 1.0, 1.0)
    """
    if (labels is None) != (scores is None) or (masks is None) != (maps is None):
        raise ValueError("pass labels together with scores, and masks together with maps")
    if labels is not None and masks is not None and np.shape(labels)[:1] != np.shape(masks)[:1]:
        raise ValueError(f"{np.shape(labels)[0]} image labels but {np.shape(masks)[0]} masks")
    results = dict.fromkeys(METRIC_KEYS, math.nan)
    if labels is not None:
        results.update(_image_metrics(labels, scores))
    if masks is not None:
        results.update(_pixel_metrics(masks, maps))
    return results
