"""Per-class evaluation on tiny synthetic sets: metrics against an independent pass, storage, undefined metrics
(panels: test_eval_panels.py)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.images import BadImageError
from vip2clip.data.index import DatasetIndex, Sample, build_index, write_index
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.transforms import preprocess, preprocess_mask
from vip2clip.evaluation.benchmark import CALIBRATION_NAME, evaluate_dataset
from vip2clip.evaluation.evaluate import collect_class_outputs, evaluate
from vip2clip.evaluation.results import ClassBatch, EvalConfig
from vip2clip.evaluation.tally import class_metrics
from vip2clip.inference import calibration as calib
from vip2clip.metrics import (
    METRIC_KEYS,
    PixelF1Histogram,
    PixelStats,
    UndefinedMetricWarning,
    best_f1_threshold,
    compute_all,
)
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.identity import ModelIdentity
from vip2clip.utils.distributed import share_range

SIZE = 64  # the conftest tiny model's input size


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> DatasetIndex:
    return generate_benchmark(
        tmp_path_factory.mktemp("bench"), classes=2, seed=4, image_size=48, n_train_good=0, n_test_good=3,
        n_test_defect=3,
    )  # fmt: skip


def _reference_outputs(model, index: DatasetIndex, name: str) -> tuple[np.ndarray, ...]:
    """Labels, scores, bool masks and float32 maps of one class (compute_all's arguments), without evaluate.py.

    One batch holds the whole class, as in the evaluation below: an untrained model's scores differ by ~1e-6,
    so even the rounding differences of another batch size could reorder them.
    """
    samples = index.samples("test", [name])
    images = torch.stack([preprocess(Image.open(index.root / s.img_path), SIZE) for s in samples])
    prediction = model.predict(images)
    masks = [
        preprocess_mask(np.asarray(Image.open(index.root / s.mask_path)) > 0 if s.mask_path else np.zeros((48, 48)),
                        SIZE).numpy() > 0.5
        for s in samples
    ]  # fmt: skip
    labels = np.array([s.anomaly for s in samples])
    return labels, prediction.pred_score.numpy(), np.stack(masks), prediction.anomaly_map.numpy()


@pytest.mark.slow  # two passes of the model over 12 images: seconds on a loaded machine
def test_metrics_and_thresholds_match_an_independent_pass(tiny_model, bench: DatasetIndex) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # an untrained model may give flat maps
        result = evaluate(tiny_model, bench, config=EvalConfig(batch_size=6))
        references = {name: _reference_outputs(tiny_model, bench, name) for name in bench.classes()}
        expected = {
            name: compute_all(labels, scores, masks=masks, maps=maps)
            for name, (labels, scores, masks, maps) in references.items()
        }
    assert [c.name for c in result.classes] == bench.classes()
    for cls in result.classes:
        labels, scores, masks, maps = references[cls.name]
        assert (cls.n_normal, cls.n_anomalous) == (3, 3)
        for key in METRIC_KEYS:
            assert cls.metrics[key] == pytest.approx(expected[cls.name][key], abs=1e-6, nan_ok=True), key
        assert cls.image_threshold == pytest.approx(best_f1_threshold(labels, scores)[1], abs=1e-6)
        # The threshold for calibration.json is counted over float16 values (one histogram for the whole dataset).
        assert cls.pixel_threshold == best_f1_threshold(masks.ravel(), maps.astype(np.float16).ravel())[1]
    for key in METRIC_KEYS:
        values = [expected[name][key] for name in expected if not math.isnan(expected[name][key])]
        assert result.mean[key] == pytest.approx(np.mean(values) if values else math.nan, nan_ok=True)
    pooled = [np.concatenate(parts) for parts in zip(*references.values(), strict=True)]
    assert result.image_threshold == pytest.approx(best_f1_threshold(pooled[0], pooled[1])[1], abs=1e-6)
    assert result.pixel_threshold == best_f1_threshold(pooled[2].ravel(), pooled[3].astype(np.float16).ravel())[1]
    assert result.n_images == 12 and result.skipped == []


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_maps_are_stored_compactly(tiny_model, bench: DatasetIndex, dtype: str) -> None:
    dataset = AnomalyDataset(bench, classes=[bench.classes()[0]], image_size=SIZE)
    predictions = collect_class_outputs(tiny_model, dataset, config=EvalConfig(map_dtype=dtype), keep_maps=True)
    assert predictions.anomaly_map.dtype == np.dtype(dtype) and predictions.anomaly_map.shape == (6, SIZE, SIZE)
    assert predictions.gt_mask.dtype == bool and predictions.pred_score.shape == (6,)
    direct = tiny_model.predict(torch.stack([dataset[i]["image"] for i in range(6)])).anomaly_map.numpy()
    np.testing.assert_array_equal(predictions.anomaly_map, direct.astype(dtype))


def test_shares_of_a_class_merge_into_the_one_process_outputs(tiny_model, bench: DatasetIndex) -> None:
    """What each rank computes under torchrun (here in one process): contiguous shares of whole batches, one of
    them empty, merged in order, give the one-process metrics, thresholds and scores exactly."""
    dataset = AnomalyDataset(bench, classes=[bench.classes()[0]], image_size=SIZE)
    config = EvalConfig(batch_size=2)
    whole = collect_class_outputs(tiny_model, dataset, config=config)
    shares = [share_range(len(dataset), rank=rank, size=4, unit=2) for rank in range(4)]
    assert [len(share) for share in shares] == [2, 2, 2, 0]
    parts = [collect_class_outputs(tiny_model, dataset, config=config, rows=share) for share in shares]
    merged = ClassBatch.merge(parts)
    np.testing.assert_array_equal(merged.pred_score, whole.pred_score)
    np.testing.assert_array_equal(merged.positions, np.arange(6))
    assert parts[3].pred_score.size == 0 and parts[3].pixel is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        expected, got = class_metrics("c", whole), class_metrics("c", merged)
    assert got.metrics == pytest.approx(expected.metrics, abs=0, nan_ok=True)
    assert (got.image_threshold, got.pixel_threshold) == (expected.image_threshold, expected.pixel_threshold)


def test_pixel_histogram_equals_the_exact_best_f1() -> None:
    rng = np.random.default_rng(0)
    histogram = PixelF1Histogram()
    maps = [np.round(rng.normal(0.5, 0.2, (3, 9, 9)), 2).astype(np.float16) for _ in range(3)]  # many ties
    maps[0][0, 0, 0] = -0.0  # -0 and +0 must count as one value
    masks = [rng.random((3, 9, 9)) < 0.3 + 0.2 * m.astype(np.float32) for m in maps]
    for batch_maps, batch_masks in zip(maps, masks, strict=True):
        histogram.add(batch_maps, batch_masks)
    best = best_f1_threshold(np.concatenate(masks).ravel(), np.concatenate(maps).ravel())
    assert histogram.best() == pytest.approx(best)
    assert all(math.isnan(v) for v in PixelF1Histogram().best())


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_histogram_from_pixel_statistics_equals_the_histogram_of_the_pixels(dtype) -> None:
    """The evaluation derives its threshold histogram from the merged pixel statistics instead of counting every
    pixel a second time: the counts must be those of the pixels themselves (float32 values round to float16)."""
    rng = np.random.default_rng(1)
    maps = rng.normal(0.5, 0.2, (4, 9, 9)).astype(dtype)
    maps[0, 0, 0], maps[0, 0, 1] = -0.0, 0.0
    masks = rng.random((4, 9, 9)) < 0.3
    direct = PixelF1Histogram()
    direct.add(maps, masks)
    stats = PixelStats.merge([PixelStats.of(masks[:2], maps[:2]), PixelStats.of(masks[2:], maps[2:])])
    derived = stats.f1_histogram()
    np.testing.assert_array_equal(derived.positive, direct.positive)
    np.testing.assert_array_equal(derived.negative, direct.negative)
    assert derived.best() == direct.best()


def _mixed_index(bench: DatasetIndex) -> DatasetIndex:
    """Four kinds of class built from the generated files: full, normal only, pixel-only and image-only."""
    full = bench.samples("test", [bench.classes()[0]])
    other = bench.samples("test", [bench.classes()[1]])

    def renamed(samples: list[Sample], name: str, drop_masks: bool = False) -> list[Sample]:
        return [
            Sample(
                img_path=s.img_path,
                mask_path="" if drop_masks else s.mask_path,
                cls_name=name,
                specie_name=s.specie_name,
                anomaly=s.anomaly,
            )
            for s in samples
        ]

    samples = (
        renamed(full, "full")
        + renamed([s for s in other if not s.anomaly], "normal_only")
        + renamed([s for s in other if s.anomaly], "pixel_only")
        + renamed(other, "image_only", drop_masks=True)
    )
    return build_index(bench.root, {"test": samples})


@pytest.mark.slow  # 24 images through the model: seconds on a loaded machine
def test_undefined_metrics_are_nan_by_kind_of_class(tiny_model, bench: DatasetIndex) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        result = evaluate(tiny_model, _mixed_index(bench), config=EvalConfig())
    by_name = {c.name: c for c in result.classes}
    assert all(math.isnan(v) for v in by_name["normal_only"].metrics.values())
    image_keys, pixel_keys = METRIC_KEYS[:3], METRIC_KEYS[3:]
    assert all(math.isnan(by_name["pixel_only"].metrics[k]) for k in image_keys)
    assert not math.isnan(by_name["pixel_only"].metrics["pixel_auroc"])
    assert all(math.isnan(by_name["image_only"].metrics[k]) for k in pixel_keys)
    assert all(not math.isnan(by_name["image_only"].metrics[k]) for k in image_keys)
    assert math.isnan(by_name["image_only"].pixel_threshold) and math.isnan(by_name["pixel_only"].image_threshold)
    # The mean of a metric skips the classes where it is undefined.
    defined = [by_name[n].metrics["image_auroc"] for n in ("full", "image_only")]
    assert result.mean["image_auroc"] == pytest.approx(np.mean(defined))


def test_calibration_file_has_null_for_the_undefined_threshold(tiny_model, bench: DatasetIndex, tmp_path: Path) -> None:
    mixed = _mixed_index(bench)
    expected = {"image_only": ("image", None), "pixel_only": (None, "pixel"), "normal_only": (None, None)}
    for name, kinds in expected.items():
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            identity = ModelIdentity.of(tiny_model)
            result = evaluate_dataset(
                tiny_model, mixed, out_dir=out, config=EvalConfig(classes=(name,)), name=name, identity=identity
            )
        if kinds == (None, None):  # one label and no defect pixels: nothing to decide with, so no file
            assert not (out / CALIBRATION_NAME).exists()
            continue
        data = json.loads((out / CALIBRATION_NAME).read_text())
        written = calib.load(out / CALIBRATION_NAME)
        for kind, value in zip(("image", "pixel"), (written.image_threshold, written.pixel_threshold), strict=True):
            if kind in kinds:
                assert value == getattr(result, f"{kind}_threshold") and math.isfinite(value)
            else:
                assert data[f"{kind}_threshold"] is None and value is None  # JSON null, not NaN


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # the header survives, the pixels do not


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_stop_or_are_skipped(tiny_model, tmp_path: Path, workers: int) -> None:
    index = generate_benchmark(tmp_path / "b", classes=1, image_size=48, n_train_good=0, n_test_good=3,
                               n_test_defect=3)  # fmt: skip
    broken = index.samples("test")[1]
    _truncate(index.root / broken.img_path)
    if workers == 0:  # a worker re-raises BadImageError as RuntimeError (its __init__ takes two arguments)
        with pytest.raises(BadImageError, match=Path(broken.img_path).name):
            evaluate(tiny_model, index, config=EvalConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        result = evaluate(tiny_model, index, config=EvalConfig(batch_size=2, num_workers=workers, skip_bad=True))
    assert [Path(p).name for p, _ in result.skipped] == [Path(broken.img_path).name]
    assert (result.classes[0].n_normal, result.classes[0].n_anomalous) == (2, 3)


def test_unknown_class_and_bad_options_are_errors(tiny_model, bench: DatasetIndex) -> None:
    with pytest.raises(ValueError, match="unknown class"):
        evaluate(tiny_model, bench, config=EvalConfig(classes=("nope",)))
    with pytest.raises(ValueError, match="map_dtype"):
        EvalConfig(map_dtype="int8")


def _checkpoint(model, path: Path, nan: bool = False) -> Path:
    state = {k: torch.full_like(v, math.nan) if nan and v.is_floating_point() else v
             for k, v in model.trainable_state_dict().items()}  # fmt: skip
    return save_checkpoint(path, model.config, state=state)


@pytest.mark.filterwarnings("ignore", category=UndefinedMetricWarning)
def test_anomalous_images_without_masks_are_left_out_of_the_pixel_metrics(
    tiny_model, bench: DatasetIndex, tmp_path: Path, capsys
) -> None:
    name = bench.classes()[0]
    samples = bench.samples("test", [name])
    maskless = next(s for s in samples if s.anomaly)
    variants = {
        "maskless": [replace(s, mask_path="") if s == maskless else s for s in samples],  # as a convert warns
        "without_it": [s for s in samples if s != maskless],
    }
    checkpoint = _checkpoint(tiny_model, tmp_path / "c.pt")
    results = {}
    for variant, kept in variants.items():
        write_index(build_index(bench.root, {"test": kept}), tmp_path / variant / "meta.json")
        argv = ["test", "--data", str(tmp_path / variant), "--checkpoint", str(checkpoint), "--batch-size", "1",
                "--out", str(tmp_path / variant / "out"), "--backbone", "tiny", "--no-progress"]  # fmt: skip
        assert main(argv) == 0  # was: "6 image labels but 5 masks", no output (batch 1: the same rounding in both)
        results[variant] = json.loads((tmp_path / variant / "out" / "results.json").read_text())
    assert "1 anomalous image(s) have no mask: left out of the pixel metrics" in capsys.readouterr().out
    ours, reference = results["maskless"]["classes"][0], results["without_it"]["classes"][0]
    assert ours["n_without_mask"] == results["maskless"]["n_without_mask"] == 1 and ours["n_anomalous"] == 3
    assert reference["n_without_mask"] == 0
    for key in METRIC_KEYS[3:]:  # the pixel metrics: as if the image were not there
        assert ours[key] == reference[key]
    assert not math.isnan(ours["image_auroc"])  # the image still counts for the image metrics


def test_a_model_with_nan_output_is_refused(tiny_model, bench: DatasetIndex, tmp_path: Path, capsys) -> None:
    checkpoint = _checkpoint(tiny_model, tmp_path / "nan.pt", nan=True)
    argv = ["test", "--data", str(bench.root), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
            "--backbone", "tiny", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    first = bench.resolve(bench.samples("test", [bench.classes()[0]])[0].img_path)
    assert f"class {bench.classes()[0]}: the model produced NaN or infinite scores or maps for {first}" in err
    assert not (tmp_path / "out" / "results.json").exists()
