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

import math

import numpy as np
from numpy.typing import ArrayLike

from vip2clip.metrics.aupro import AUPRO_VARIANTS, aupro, aupro_cflow
from vip2clip.metrics.pixels import PixelStats, PixelStatsAccumulator, ScoreRun, pixel_auroc, pixel_data, pixel_max_f1
from vip2clip.metrics.ranking import (
    UndefinedMetric,
    UndefinedMetricWarning,
    best_f1_threshold,
    guarded,
    image_ap,
    image_auroc,
    image_ranking,
    max_f1,
    ranking_auroc,
    ranking_average_precision,
    ranking_best_f1,
    warn_undefined,
)
from vip2clip.metrics.threshold import PixelF1Histogram, StreamingQuantile, normal_quantile_thresholds

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1")
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_f1")
METRIC_KEYS = IMAGE_KEYS + PIXEL_KEYS

__all__ = [
    "AUPRO_VARIANTS",
    "IMAGE_KEYS",
    "METRIC_KEYS",
    "PIXEL_KEYS",
    "PixelF1Histogram",
    "PixelStats",
    "PixelStatsAccumulator",
    "ScoreRun",
    "StreamingQuantile",
    "UndefinedMetricWarning",
    "aupro",
    "best_f1_threshold",
    "compute_all",
    "image_ap",
    "image_auroc",
    "max_f1",
    "normal_quantile_thresholds",
    "pixel_auroc",
    "pixel_max_f1",
    "pixel_metrics",
]


def _image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    try:
        ranking = image_ranking(labels, scores)
    except UndefinedMetric as undefined:
        return {key: warn_undefined(key, str(undefined)) for key in IMAGE_KEYS}
    return {
        "image_auroc": ranking_auroc(ranking),
        "image_ap": ranking_average_precision(ranking),
        "image_f1": ranking_best_f1(ranking)[0],
    }


def pixel_metrics(stats: PixelStats) -> dict[str, float]:
    """The three pixel metrics (keys `PIXEL_KEYS`) from a class's `PixelStats`, e.g. merged from the shares of
    several processes: equal, bit for bit, to `compute_all`'s on the whole maps."""
    try:
        data = pixel_data(stats)
    except UndefinedMetric as undefined:
        return {key: warn_undefined(key, str(undefined)) for key in PIXEL_KEYS}
    return {
        "pixel_auroc": ranking_auroc(data.ranking),
        "pixel_aupro": guarded("pixel_aupro", lambda: aupro_cflow(data, fpr_limit=0.3, num_thresholds=200)),
        "pixel_f1": ranking_best_f1(data.ranking)[0],
    }


def compute_all(
    labels: ArrayLike | None, scores: ArrayLike | None, *, masks: ArrayLike | None = None, maps: ArrayLike | None = None
) -> dict[str, float]:
    """The six metrics of one class as fractions in [0, 1], keyed by `METRIC_KEYS`.

    labels int {0, 1} [N] and scores float [N]; masks bool [N, H, W] and maps float [N, H, W] (float16 accepted).
    Pass `masks=maps=None` for image-level-only data (pixel keys NaN, no warning) and `labels=scores=None` for
    pixel-only data; single-label image data (e.g. all anomalous) gives NaN image keys with warnings.

    >>> m = compute_all([0, 1], [0.2, 0.9], masks=[[[0, 0]], [[0, 1]]], maps=[[[0.1, 0.3]], [[0.2, 0.8]]])
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
        results.update(pixel_metrics(PixelStats.of(masks, maps)))
    return results
