"""Ranking metrics without threshold loops: AUROC, average precision and max-F1, for image scores and pixel maps.

A curve can only gain a positive at a score that some positive sample (anomalous image, defect pixel) has, so
every metric is derived from counts at the distinct positive scores, ranked by binary search against one sorted
copy of all scores. Undefined metrics return NaN with an `UndefinedMetricWarning` naming the metric.

This is the metrics package's core: `Ranking`, the metrics of a ranking (`ranking_auroc`, ...), input checks and
the undefined-metric signal are shared with `pixels` and `aupro` under names without an underscore; the public API
is `vip2clip.metrics`'s `__all__`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given data (for example only one label is present); it is returned as NaN."""


class UndefinedMetric(Exception):
    """Internal signal: the metric is undefined; the message says why."""


def warn_undefined(metric: str, reason: str) -> float:
    # Point the warning at the first frame outside this module, however deep the call came from.
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("vip2clip.metrics"):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", UndefinedMetricWarning, stacklevel=level)
    return math.nan


def guarded(metric: str, compute: Callable[[], float]) -> float:
    """`compute()`, or NaN with a warning naming `metric` when it is undefined."""
    try:
        return compute()
    except UndefinedMetric as undefined:
        return warn_undefined(metric, str(undefined))


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


def pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked masks (bool [N, H, W]) and maps (float [N, H, W])."""
    m, a = _as_binary(masks, "masks"), _as_scores(maps, "maps")
    if m.ndim != 3 or a.shape != m.shape or m.size == 0:
        raise ValueError(
            f"masks and maps must be non-empty [N, H, W] arrays of equal shape, got {m.shape} and {a.shape}"
        )
    return m, a


# ---------------------------------------------------------------------------------------------------- ranking


@dataclass(frozen=True, kw_only=True)
class Ranking:
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


def _rank(pos_sorted: np.ndarray, all_sorted: np.ndarray) -> Ranking:
    """Ranking of the positives' scores [P] among all scores [M], both sorted ascending, same dtype."""
    n_pos, n_all = pos_sorted.size, all_sorted.size
    starts = _run_starts(pos_sorted)
    values = pos_sorted[starts]
    pos_ge = n_pos - starts
    pos_gt = np.append(pos_ge[1:], 0)
    all_ge = n_all - np.searchsorted(all_sorted, values, side="left")
    all_gt = n_all - np.searchsorted(all_sorted, values, side="right")
    return Ranking(
        values=values,
        pos_ge=pos_ge,
        neg_ge=all_ge - pos_ge,
        neg_gt=all_gt - pos_gt,
        n_pos=n_pos,
        n_neg=n_all - n_pos,
    )


def ranking_auroc(r: Ranking) -> float:
    """Mann-Whitney form of the ROC area: P(score_pos > score_neg) + P(tie) / 2, equal to sklearn's trapezoid."""
    pos_at = r.pos_ge - np.append(r.pos_ge[1:], 0)
    neg_below = r.n_neg - r.neg_ge
    neg_at = r.neg_ge - r.neg_gt
    return float(np.dot(pos_at, neg_below + 0.5 * neg_at) / (r.n_pos * r.n_neg))


def ranking_average_precision(r: Ranking) -> float:
    """sklearn's AP, sum of (recall step) x precision; recall only steps at positive scores."""
    pos_at = r.pos_ge - np.append(r.pos_ge[1:], 0)
    return float(np.sum(pos_at / r.n_pos * (r.pos_ge / (r.pos_ge + r.neg_ge))))


def ranking_best_f1(r: Ranking) -> tuple[float, float]:
    """(max F1, its threshold) with "score >= threshold" as positive.

    F1 = 2PR / (P + R) = 2 tp / (tp + fp + n_pos). For a fixed tp the best threshold is the highest one, a
    positive score, so these thresholds are all that sklearn's curve could add. Ties go to the lowest threshold,
    like `thresholds[argmax(f1)]` over sklearn's ascending thresholds.
    """
    f1 = 2.0 * r.pos_ge / (r.pos_ge + r.neg_ge + r.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(r.values[best])


# ------------------------------------------------------------------------------------------------ image level


def image_ranking(labels: ArrayLike, scores: ArrayLike) -> Ranking:
    y, s = _image_inputs(labels, scores)
    n_pos = int(y.sum())
    if n_pos in (0, y.size):
        raise UndefinedMetric(f"all {y.size} image labels are {int(y[0])}")
    return _rank(np.sort(s[y]), np.sort(s))


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level AUROC. labels: int {0, 1} [N] (1 = anomalous); scores: float [N]."""
    return guarded("image_auroc", lambda: ranking_auroc(image_ranking(labels, scores)))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level average precision (sklearn's `average_precision_score`). labels [N], scores [N]."""
    return guarded("image_ap", lambda: ranking_average_precision(image_ranking(labels, scores)))


def max_f1(labels: ArrayLike, scores: ArrayLike) -> float:
    """Max F1 over the precision-recall curve (0/0 counts as 0). labels [N], scores [N]."""
    return best_f1_threshold(labels, scores)[0]


def best_f1_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """(max F1, threshold): predicting "anomalous" for score >= threshold reaches that F1. (NaN, NaN) if undefined."""
    try:
        return ranking_best_f1(image_ranking(labels, scores))
    except UndefinedMetric as undefined:
        nan = warn_undefined("max_f1", str(undefined))
        return nan, nan
