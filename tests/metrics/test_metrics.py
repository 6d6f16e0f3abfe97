"""Tests of vip2clip.metrics against scikit-learn, brute-force sweeps, slow literal loops and hand-computed cases.

The naive references (`vip2clip.testing.metric_oracles`) are deliberately threshold-by-threshold;
`benchmarks/bench_metrics.py` measures against the same loop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from vip2clip import metrics
from vip2clip.testing.metric_oracles import brute_force_max_f1, naive_aupro_cflow, naive_aupro_exact

# ------------------------------------------------------------------------------------------ naive references


def make_class(
    seed: int, n: int = 5, size: int = 24, levels: int | None = None, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic class: blob masks (several regions, image 0 normal) and noisy maps that partly follow them.

    Returns masks bool [n, size, size] and maps in [0, 1] [n, size, size]; `levels` quantises the maps (ties).
    """
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 1.5, 1.5))
    masks = field > 1.2 * field.std()
    masks[0] = False
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), sigma=(0, 1, 1))
    maps = 0.6 * masks + noise + 0.3 * rng.standard_normal((n, size, size))
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    if levels is not None:
        maps = np.round(maps * (levels - 1)) / (levels - 1)
    return masks, maps.astype(dtype)


def image_data(seed: int, n: int = 40, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = rng.random(n) + 0.5 * labels
    if levels is not None:
        scores = np.round(scores * levels) / levels
    return labels, scores


# ------------------------------------------------------------------------------------------------ image level


@pytest.mark.parametrize("levels", [None, 3, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn_and_brute_force(seed: int, levels: int | None) -> None:
    labels, scores = image_data(seed, levels=levels)
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert metrics.image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert metrics.max_f1(labels, scores) == pytest.approx(brute_force_max_f1(labels, scores), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 3])
def test_best_f1_threshold_reaches_its_f1(seed: int) -> None:
    labels, scores = image_data(seed, levels=5)
    f1, threshold = metrics.best_f1_threshold(labels, scores)
    assert f1 == pytest.approx(brute_force_max_f1(labels, scores), abs=1e-9)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-9)
    assert threshold in set(scores[labels == 1])


def test_image_hand_computed_ties() -> None:
    # Positives {0.5, 0.9}, negatives {0.5, 0.1}: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5 tie, 0.5>0.1) -> 3.5 / 4.
    labels, scores = [1, 1, 0, 0], [0.5, 0.9, 0.5, 0.1]
    assert metrics.image_auroc(labels, scores) == pytest.approx(0.875)
    # Threshold 0.9: P=1 R=1/2 -> F1 2/3; threshold 0.5: P=2/3 R=1 -> F1 0.8.
    assert metrics.best_f1_threshold(labels, scores) == pytest.approx((0.8, 0.5))
    # AP = 1/2 * 1 + 1/2 * 2/3.
    assert metrics.image_ap(labels, scores) == pytest.approx(5 / 6)


@pytest.mark.parametrize("function", [metrics.image_auroc, metrics.image_ap, metrics.max_f1])
@pytest.mark.parametrize("value", [0, 1])
def test_single_label_gives_nan_and_a_warning(function, value: int) -> None:
    with pytest.warns(metrics.UndefinedMetricWarning, match=r"(image_auroc|image_ap|max_f1) is undefined"):
        assert np.isnan(function([value] * 4, [0.1, 0.2, 0.3, 0.4]))


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1], [0.1, 0.2, 0.3], "equal length"),
        ([0, 1], ["a", "b"], "real numbers"),
    ],
)
def test_bad_image_input_is_a_clear_error(labels, scores, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.image_auroc(labels, scores)


# ------------------------------------------------------------------------------------- pixel AUROC and max-F1


@pytest.mark.parametrize("levels", [None, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_and_f1_match_references(seed: int, levels: int | None) -> None:
    masks, maps = make_class(seed, levels=levels)
    expected_auroc = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected_auroc, abs=1e-6)
    assert metrics.pixel_max_f1(masks, maps) == pytest.approx(brute_force_max_f1(masks, maps), abs=1e-9)


def test_pixel_metrics_accept_float16_maps() -> None:
    masks, maps = make_class(4)
    half = maps.astype(np.float16)
    expected = roc_auc_score(masks.ravel(), half.astype(np.float32).ravel())
    assert metrics.pixel_auroc(masks, half) == pytest.approx(expected, abs=1e-6)
    assert metrics.pixel_max_f1(masks, half) == pytest.approx(brute_force_max_f1(masks, half), abs=1e-9)


# ------------------------------------------------------------------------------------------------------ AUPRO


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, None), (2, 6)])
def test_aupro_cflow_matches_the_literal_loop(seed: int, levels: int | None) -> None:
    masks, maps = make_class(seed, levels=levels)
    assert metrics.aupro(masks, maps) == pytest.approx(naive_aupro_cflow(masks, maps), abs=1e-4)


@pytest.mark.parametrize("num_thresholds", [8, 16])
def test_aupro_cflow_thresholds_equal_to_map_values(num_thresholds: int) -> None:
    # Integer maps 0..8 with a step of 1 or 0.5: many thresholds equal map values exactly, so `>` vs `>=` matters.
    masks, maps = make_class(5, levels=9)
    maps = (maps * 8).astype(np.float32)
    expected = naive_aupro_cflow(masks, maps, max_step=num_thresholds)
    assert metrics.aupro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(expected, abs=1e-9)


def test_aupro_cflow_float16_maps_follow_the_loop_on_them() -> None:
    masks, maps = make_class(6)
    half = maps.astype(np.float16)
    assert metrics.aupro(masks, half) == pytest.approx(naive_aupro_cflow(masks, half), abs=1e-4)
    assert metrics.aupro(masks, half) == pytest.approx(metrics.aupro(masks, maps), abs=0.02)


@pytest.mark.parametrize(("seed", "levels", "limit"), [(0, None, 0.3), (1, 5, 0.3), (2, None, 0.05), (3, None, 1.0)])
def test_aupro_exact_matches_the_naive_curve(seed: int, levels: int | None, limit: float) -> None:
    masks, maps = make_class(seed, levels=levels)
    expected = naive_aupro_exact(masks, maps, limit=limit)
    assert metrics.aupro(masks, maps, variant="exact", fpr_limit=limit) == pytest.approx(expected, abs=1e-4)


def test_aupro_one_region_of_one_pixel() -> None:
    # Defect 0.85 among normals 0.0, 0.1, ..., 0.9 (float64 so the values are what they read).
    maps = np.array([[[0.85, *np.arange(10) / 10]]])
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = True
    # Exact: PRO 0 up to FPR 0.1 (only 0.9 is above the defect), then 1 -> (0.3 - 0.1) / 0.3.
    assert metrics.aupro(masks, maps, variant="exact") == pytest.approx(2 / 3)
    # cflow: the kept FPRs are 0.2 (threshold in [0.7, 0.8)) and 0.1, PRO 1 across them -> rescaled area 1.
    assert metrics.aupro(masks, maps) == pytest.approx(1.0)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.9)
    assert metrics.pixel_max_f1(masks, maps) == pytest.approx(2 / 3)


def test_aupro_two_regions() -> None:
    # Region A: one pixel at 0.9; region B: two pixels at 0.9 and 0.3; 12 normal pixels, one of them at 0.5.
    maps = np.zeros((1, 3, 5))
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 4] = masks[0, 1, 4] = True
    maps[0, 0, 0], maps[0, 0, 4], maps[0, 1, 4], maps[0, 2, 2] = 0.9, 0.9, 0.3, 0.5
    # Exact: PRO 0.75 for FPR in [0, 1/12], then 1 up to 0.3.
    assert metrics.aupro(masks, maps, variant="exact") == pytest.approx((0.75 / 12 + 0.3 - 1 / 12) / 0.3)
    # cflow: FPR 1/12 for thresholds below 0.5 (rescaled to 1), else 0; PRO 0.75 on both sides of that jump.
    assert metrics.aupro(masks, maps) == pytest.approx(0.75)


def test_aupro_regions_are_8_connected() -> None:
    # Pixels (0,0)=0.9, (1,1)=0.1, (1,2)=0.1 touch diagonally: one region of 3 (4-connectivity would make two).
    maps = np.zeros((1, 3, 3))
    masks = np.zeros(maps.shape, dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 1, 2], maps[0, 2, 0] = 0.9, 0.1, 0.1, 0.5
    expected = (1 / 3 * 1 / 6 + 0.3 - 1 / 6) / 0.3
    assert metrics.aupro(masks, maps, variant="exact") == pytest.approx(expected)
    assert expected == pytest.approx(naive_aupro_exact(masks, maps))


@pytest.mark.parametrize("normals_at_min", [False, True])
def test_perfect_map_scores_one(normals_at_min: bool) -> None:
    masks, _ = make_class(7)
    rng = np.random.default_rng(0)
    normal = np.zeros(masks.shape) if normals_at_min else rng.uniform(0.0, 0.4, masks.shape)
    maps = np.where(masks, rng.uniform(0.6, 1.0, masks.shape), normal)
    for variant in metrics.AUPRO_VARIANTS:
        assert metrics.aupro(masks, maps, variant=variant) == pytest.approx(1.0)
    assert metrics.compute_all(None, None, masks=masks, maps=maps) == pytest.approx(
        {"image_auroc": np.nan, "image_ap": np.nan, "image_f1": np.nan} | dict.fromkeys(metrics.PIXEL_KEYS, 1.0),
        nan_ok=True,
    )


def test_constant_map() -> None:
    masks, _ = make_class(8)
    maps = np.full(masks.shape, 0.25, dtype=np.float32)
    with pytest.warns(metrics.UndefinedMetricWarning, match="pixel_aupro is undefined.*constant"):
        assert np.isnan(metrics.aupro(masks, maps))
    # Exact curve: straight from (0, 0) to (1, 1) -> area 0.3^2 / 2, divided by 0.3.
    assert metrics.aupro(masks, maps, variant="exact") == pytest.approx(0.15)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.5)
    assert metrics.pixel_max_f1(masks, maps) == pytest.approx(2 * masks.mean() / (1 + masks.mean()))


def test_class_without_defects_gives_nan_and_warnings() -> None:
    masks, maps = make_class(9)
    masks[:] = False
    with pytest.warns(metrics.UndefinedMetricWarning, match="pixel_aupro is undefined"):
        assert np.isnan(metrics.aupro(masks, maps, variant="exact"))
    with pytest.warns(metrics.UndefinedMetricWarning) as record:
        result = metrics.compute_all(np.zeros(len(masks), dtype=int), np.zeros(len(masks)), masks=masks, maps=maps)
    assert all(np.isnan(value) for value in result.values())
    warned = " ".join(str(w.message) for w in record)
    assert all(key in warned for key in metrics.METRIC_KEYS)


@pytest.mark.parametrize(
    ("masks", "maps", "kwargs", "message"),
    [
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)), {}, "equal shape"),
        (np.full((2, 4, 4), 255, np.uint8), np.zeros((2, 4, 4)), {}, "0/1"),
        (np.zeros((2, 4, 4), bool), np.full((2, 4, 4), np.inf), {}, "infinite"),
        (np.zeros((4, 4), bool), np.zeros((4, 4)), {}, r"\[N, H, W\]"),
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)), {"variant": "mvtec"}, "cflow, exact"),
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)), {"fpr_limit": 0.0}, "fpr_limit"),
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)), {"num_thresholds": 2.5}, "num_thresholds"),
    ],
)
def test_bad_pixel_input_is_a_clear_error(masks, maps, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.aupro(masks, maps, **kwargs)


# ------------------------------------------------------------------------------------------------ compute_all


def test_compute_all_matches_the_single_metrics() -> None:
    masks, maps = make_class(10, levels=50)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics.compute_all(labels, scores, masks=masks, maps=maps.astype(np.float16))
    assert tuple(result) == metrics.METRIC_KEYS
    assert all(isinstance(value, float) and 0.0 <= value <= 1.0 for value in result.values())
    half = maps.astype(np.float16)
    assert result == pytest.approx(
        {
            "image_auroc": roc_auc_score(labels, scores),
            "image_ap": average_precision_score(labels, scores),
            "image_f1": brute_force_max_f1(labels, scores),
            "pixel_auroc": roc_auc_score(masks.ravel(), half.ravel().astype(np.float32)),
            "pixel_aupro": naive_aupro_cflow(masks, half),
            "pixel_f1": brute_force_max_f1(masks, half),
        },
        abs=1e-4,
    )


def test_compute_all_image_only_and_pixel_only() -> None:
    labels, scores = image_data(11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # missing pixel data is expected: no warning
        image_only = metrics.compute_all(labels, scores)
    assert all(np.isnan(image_only[key]) for key in metrics.PIXEL_KEYS)
    assert image_only["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))

    masks, maps = make_class(11)
    with pytest.warns(metrics.UndefinedMetricWarning) as record:
        pixel_only = metrics.compute_all(np.ones(len(masks), dtype=int), maps.max(axis=(1, 2)), masks=masks, maps=maps)
    assert sorted(str(w.message).split()[0] for w in record) == sorted(metrics.IMAGE_KEYS)
    assert all(np.isnan(pixel_only[key]) for key in metrics.IMAGE_KEYS)
    assert pixel_only["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_compute_all_rejects_mismatched_arguments() -> None:
    masks, maps = make_class(12)
    with pytest.raises(ValueError, match="together"):
        metrics.compute_all([0, 1], None)
    with pytest.raises(ValueError, match="3 image labels but 5 masks"):
        metrics.compute_all([0, 1, 1], [0.1, 0.2, 0.3], masks=masks, maps=maps)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_pixel_stats_of_parts_merge_into_the_whole(dtype) -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((9, 12, 13)) < 0.15
    maps = (np.round(rng.random((9, 12, 13)) * 40) / 40 + 0.3 * masks).astype(dtype)
    maps[0, 0, 0] = -0.0  # -0 and +0 are one value
    whole = metrics.PixelStats.of(masks, maps)
    parts = [metrics.PixelStats.of(masks[a:b], maps[a:b]) for a, b in ((0, 2), (2, 3), (3, 9))]
    merged = metrics.PixelStats.merge(parts)
    for field in ("defect_values", "defect_regions"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(whole, field), err_msg=field)
    assert merged.n_regions == whole.n_regions and whole.n_pixels == merged.n_pixels == maps.size
    assert merged.dtype == dtype and all(run.values.dtype == dtype for run in merged.normal)
    thresholds = np.unique(maps)
    for strict in (False, True):
        expected_counts = [np.sum(maps[~masks] < t if strict else maps[~masks] <= t) for t in thresholds]
        np.testing.assert_array_equal(merged.normal_at_or_below(thresholds, strict), expected_counts)
    expected = metrics.compute_all(None, None, masks=masks, maps=maps)
    assert metrics.pixel_metrics(merged) == {key: expected[key] for key in metrics.PIXEL_KEYS}  # bit for bit
    with pytest.raises(ValueError, match="dtypes"):
        metrics.PixelStats.merge([whole, metrics.PixelStats.of(masks, maps.astype(np.float64))])


def test_streaming_quantiles_merge_exactly() -> None:
    rng = np.random.default_rng(4)
    values = rng.random(5000)
    whole = metrics.StreamingQuantile(0.999, 5000)
    whole.add(values)
    parts = [metrics.StreamingQuantile(0.999, 5000) for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(values, 3), strict=True):
        part.add(chunk)
    for part in parts[1:]:
        parts[0].merge(part)
    assert parts[0].count == 5000 and parts[0].value() == whole.value() == pytest.approx(np.quantile(values, 0.999))
    with pytest.raises(ValueError, match="same quantile"):
        parts[0].merge(metrics.StreamingQuantile(0.99, 5000))


def test_accumulated_batches_keep_few_bounded_runs(monkeypatch) -> None:
    """Merged batch by batch, the normal scores stay in a few sorted runs of at most MAX_RUN scores (the extra
    memory of a merge) and give the metrics of the whole class, bit for bit."""
    monkeypatch.setattr(metrics.pixels, "MAX_RUN", 300)
    rng = np.random.default_rng(6)
    masks = rng.random((40, 6, 7)) < 0.2
    maps = (rng.random((40, 6, 7)) + 0.2 * masks).astype(np.float32)
    accumulator = metrics.PixelStatsAccumulator()
    for i in range(40):
        accumulator.add(metrics.PixelStats.of(masks[i : i + 1], maps[i : i + 1]))
    merged = accumulator.result()
    sizes = [run.values.size for run in merged.normal]
    assert max(sizes) <= 300 and len(sizes) <= 8 and sum(sizes) == int((~masks).sum())
    assert all(np.all(np.diff(run.values) >= 0) for run in merged.normal)
    expected = metrics.compute_all(None, None, masks=masks, maps=maps)
    assert metrics.pixel_metrics(merged) == {key: expected[key] for key in metrics.PIXEL_KEYS}
    with pytest.raises(ValueError, match="nothing to merge"):
        metrics.PixelStatsAccumulator().result()
