"""AUPRO, the area under the per-region-overlap curve up to a pixel FPR limit (cflow's and MVTec's variants)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from vip2clip.metrics.pixels import PixelData, PixelStats, pixel_data
from vip2clip.metrics.ranking import UndefinedMetric, guarded

AUPRO_VARIANTS = ("cflow", "exact")


def _pro_at_values(data: PixelData) -> np.ndarray:
    """PRO with threshold "score >= v" at each distinct defect score v of the ranking [U].

    Each defect pixel carries weight 1 / (regions x its region's size), so the weights above a threshold sum to
    the mean over regions of the fraction of the region above it.
    """
    stats = data.stats
    regions = stats.defect_regions
    weight = 1.0 / (stats.n_regions * np.bincount(regions)[regions])
    value_index = np.searchsorted(data.ranking.values, stats.defect_values)
    mass = np.bincount(value_index, weights=weight, minlength=data.ranking.values.size)
    # Rounding in the running sum could push the top a hair over 1, as MVTec's code also notes.
    return np.minimum(np.cumsum(mass[::-1])[::-1], 1.0)


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


def aupro_cflow(data: PixelData, *, fpr_limit: float, num_thresholds: int) -> float:
    """The community loop's AUPRO, computed at all its thresholds at once (see the module docstring)."""
    r, stats = data.ranking, data.stats
    lowest, highest = stats.extremes()
    # Built exactly like the loop (min, max and step in the maps' dtype, np.arange with a step), so the thresholds
    # and hence the score match it, also for float16 maps.
    step = (highest - lowest) / num_thresholds
    if not step > 0:
        raise UndefinedMetric(f"the maps are constant (or too narrow for {num_thresholds} {stats.dtype} steps)")
    grid = _floor_to_dtype(np.arange(lowest, highest, step), stats.dtype)
    fpr = (r.n_neg - stats.normal_at_or_below(grid)) / r.n_neg
    pro = np.append(_pro_at_values(data), 0.0)[np.searchsorted(r.values, grid, side="right")]
    keep = fpr < fpr_limit
    if not keep.any():
        raise UndefinedMetric(f"no threshold has a pixel FPR below {fpr_limit}")
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


def _aupro_exact(data: PixelData, fpr_limit: float) -> float:
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


def _aupro(data: PixelData, variant: str, fpr_limit: float, num_thresholds: int) -> float:
    if variant == "cflow":
        return aupro_cflow(data, fpr_limit=fpr_limit, num_thresholds=num_thresholds)
    return _aupro_exact(data, fpr_limit)


def _check_aupro_options(variant: str, fpr_limit: float, num_thresholds: int) -> None:
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"unknown AUPRO variant {variant!r}; valid variants: {', '.join(AUPRO_VARIANTS)}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if int(num_thresholds) != num_thresholds or num_thresholds < 1:
        raise ValueError(f"num_thresholds must be a positive integer, got {num_thresholds}")


def aupro(
    masks: ArrayLike, maps: ArrayLike, *, variant: str = "cflow", fpr_limit: float = 0.3, num_thresholds: int = 200
) -> float:
    """Area under the PRO curve up to `fpr_limit`, in [0, 1]. masks bool [N, H, W]; maps float [N, H, W].

    variant "cflow": the release's 200-threshold procedure (`num_thresholds` applies only to it); "exact": MVTec's.
    NaN with a warning for a class without defect pixels, and for "cflow" also for constant maps.
    """
    _check_aupro_options(variant, fpr_limit, num_thresholds)
    stats = PixelStats.of(masks, maps)
    return guarded("pixel_aupro", lambda: _aupro(pixel_data(stats), variant, fpr_limit, int(num_thresholds)))


# ------------------------------------------------------------------------------------------------------ all six
