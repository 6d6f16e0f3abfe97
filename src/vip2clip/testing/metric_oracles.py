"""Slow, literal reference computations of the metrics, one threshold at a time: what `vip2clip.metrics` is checked
against (tests/metrics/test_metrics.py) and measured against (benchmarks/bench_metrics.py). Written from the
metrics' definitions, importing nothing of vip2clip.
"""

from __future__ import annotations

import itertools

import numpy as np
from skimage import measure
from sklearn.metrics import auc


def naive_aupro_cflow(masks: np.ndarray, maps: np.ndarray, *, max_step: int = 200, expect_fpr: float = 0.3) -> float:
    """The community loop (release / AnomalyCLIP procedure), one threshold at a time."""
    min_th, max_th = maps.min(), maps.max()
    delta = (max_th - min_th) / max_step
    normal = ~masks
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = np.zeros_like(maps, dtype=bool)
        binary[maps <= th] = False
        binary[maps > th] = True
        overlaps = []
        for predicted, mask in zip(binary, masks, strict=True):
            for region in measure.regionprops(measure.label(mask)):
                overlaps.append(predicted[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < expect_fpr
    kept = fprs[keep]
    return float(auc((kept - kept.min()) / (kept.max() - kept.min()), pros[keep]))


def naive_aupro_exact(masks: np.ndarray, maps: np.ndarray, *, limit: float = 0.3) -> float:
    """MVTec's AUPRO: PRO and FPR at every distinct threshold, cut at `limit` segment by segment."""
    regions = [
        (index, labels == k)
        for index, mask in enumerate(masks)
        for labels in [measure.label(mask, connectivity=2)]
        for k in range(1, labels.max() + 1)
    ]
    normal_values = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pro = np.mean([np.mean(maps[index][region] >= t) for index, region in regions])
        points.append((np.mean(normal_values >= t), pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            x1, y1 = limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def brute_force_max_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max F1 = 2tp / (2tp + fp + fn) of "score >= t" over every score t, one threshold at a time."""
    labels, scores = np.ravel(labels).astype(bool), np.ravel(scores)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        if tp:
            best = max(best, 2 * tp / (2 * tp + np.sum(predicted & ~labels) + np.sum(~predicted & labels)))
    return best


# ----------------------------------------------------------------------------------------------- test data
