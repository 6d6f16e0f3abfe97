"""Calibration files: the normal-quantile rule against numpy, the streaming quantile, file I/O and model checks."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

import vip2clip
from vip2clip import metrics
from vip2clip.inference import calibration as calib
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.identity import ModelIdentity
from vip2clip.utils.hashing import file_sha256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("calib") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, state=tiny_model.trainable_state_dict())


@pytest.fixture(scope="module")
def identity(tiny_model, checkpoint: Path) -> PredictorIdentity:
    return PredictorIdentity(ModelIdentity.of(tiny_model, checkpoint))


def _normal_data(n_images: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return rng.random(n_images), [rng.random((12, 9)).astype(np.float32) for _ in range(n_images)]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("sizes", [[1], [7], [100, 3, 250], [40] * 30])
def test_streaming_quantile_equals_numpy(q: float, sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    chunks = [rng.normal(size=n) for n in sizes]
    # The bound is larger than what arrives, as when some images turn out unreadable.
    stream = metrics.StreamingQuantile(q, sum(sizes) + 37)
    for chunk in chunks:
        stream.add(chunk)
    assert stream.count == sum(sizes)
    assert stream.value() == pytest.approx(np.quantile(np.concatenate(chunks), q), abs=1e-12)
    assert stream._top.size <= stream.keep


def test_streaming_quantile_with_ties_and_bad_input() -> None:
    stream = metrics.StreamingQuantile(0.99, 1000)
    stream.add(np.full(500, 0.25))
    stream.add(np.concatenate([np.full(490, 0.25), np.full(10, 0.75)]))
    assert stream.value() == pytest.approx(np.quantile(np.r_[np.full(990, 0.25), np.full(10, 0.75)], 0.99))
    with pytest.raises(ValueError, match="max_count"):
        stream.add(np.zeros(1))
    with pytest.raises(ValueError, match="NaN"):
        metrics.StreamingQuantile(0.5, 10).add(np.array([np.nan]))
    with pytest.raises(ValueError, match="no pixel scores"):
        metrics.StreamingQuantile(0.5, 10).value()
    with pytest.raises(ValueError, match="quantile"):
        metrics.StreamingQuantile(0.0, 10)


def test_normal_quantile_rule_matches_pooled_numpy() -> None:
    scores, maps = _normal_data(25)
    image_threshold, pixel_threshold = metrics.normal_quantile_thresholds(
        scores, maps, image_quantile=0.95, pixel_quantile=0.999
    )
    assert image_threshold == pytest.approx(np.quantile(scores, 0.95))
    pooled = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    assert pixel_threshold == pytest.approx(np.quantile(pooled, 0.999))
    # A stacked array and a pre-fed stream give the same answer.
    assert metrics.normal_quantile_thresholds(scores, np.stack(maps), image_quantile=0.95, pixel_quantile=0.999)[
        1
    ] == pytest.approx(pixel_threshold)
    stream = metrics.StreamingQuantile(0.999, pooled.size)
    for m in maps:
        stream.add(m)
    assert metrics.normal_quantile_thresholds(scores, stream, image_quantile=0.95)[1] == pytest.approx(pixel_threshold)
    # About 5 % of the normal images and 0.1 % of their pixels land above the thresholds (within one sample).
    assert np.mean(scores > image_threshold) <= 0.05 + 1 / scores.size
    assert np.mean(pooled > pixel_threshold) <= 0.001 + 1 / pooled.size


def test_normal_quantile_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError, match="no normal images"):
        metrics.normal_quantile_thresholds([], [np.zeros(3)])
    with pytest.raises(ValueError, match="NaN"):
        metrics.normal_quantile_thresholds([0.1, float("nan")], [np.zeros(3)])
    with pytest.raises(ValueError, match="NaN"):
        metrics.normal_quantile_thresholds([0.1], [np.array([np.inf])])
    with pytest.raises(ValueError, match="pixel_quantile"):
        metrics.normal_quantile_thresholds([0.1], [np.zeros(3)], pixel_quantile=1.5)


def test_calibrate_from_normal_records_rule_and_model(tiny_model, checkpoint: Path, identity) -> None:
    scores, maps = _normal_data(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 20 images is enough: no warning
        result = calib.calibrate_from_normal(scores, maps, identity=identity, image_quantile=0.9)
    assert result.method == calib.METHOD_NORMAL
    assert (result.quantile, result.pixel_quantile, result.n_images) == (0.9, 0.999, 20)
    assert result.image_threshold == pytest.approx(np.quantile(scores, 0.9))
    assert result.identity.model.backbone == "tiny" and result.identity.model.image_size == tiny_model.config.image_size
    assert result.identity.model.checkpoint == str(checkpoint.resolve())
    assert result.identity.model.checkpoint_sha256 == file_sha256(checkpoint)
    assert result.identity.model.fingerprint == tiny_model.backbone.fingerprint()


def test_few_normal_images_warn(tiny_model) -> None:
    scores, maps = _normal_data(5)
    with pytest.warns(UserWarning, match="only 5 normal images"):
        calib.calibrate_from_normal(scores, maps, identity=PredictorIdentity(ModelIdentity.of(tiny_model)))


def test_save_load_round_trip(identity, tmp_path: Path) -> None:
    original = calib.make_calibration(
        identity, image_threshold=0.61, pixel_threshold=0.7, method=calib.METHOD_F1, n_images=12
    )
    path = original.save(tmp_path / "sub" / "calibration.json")
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary file left behind
    data = json.loads(path.read_text())
    assert data["format"] == calib.FORMAT and data["method"] == "f1-optimal on labelled images"
    assert data["model"]["checkpoint_sha256"] == identity.model.checkpoint_sha256
    assert calib.load(path) == original


def test_format_1_files_are_read(identity, tmp_path: Path) -> None:
    """Files written before the identity record (flat checkpoint/backbone fields) still load and are checked."""
    flat = {
        "format": calib.FORMAT, "format_version": 1, "image_threshold": 0.4, "pixel_threshold": 0.6,
        "method": calib.METHOD_NORMAL, "quantile": 0.99, "n_images": 30, "checkpoint": identity.model.checkpoint,
        "checkpoint_sha256": identity.model.checkpoint_sha256, "backbone": "tiny",
        "image_size": identity.model.image_size,
        "created": "2026-01-01T00:00:00+00:00", "pixel_quantile": 0.999,
    }  # fmt: skip
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(flat))
    loaded = calib.load(path)
    assert (loaded.image_threshold, loaded.identity.model.checkpoint_sha256) == (0.4, identity.model.checkpoint_sha256)
    assert loaded.identity.model.fingerprint is None and loaded.identity.model.top_k is None  # unknown: not checked
    loaded.check_compatible(identity)
    path.write_text(json.dumps({**flat, "image_size": 999}))
    with pytest.raises(ValueError, match="image size: calibrated with 999"):
        calib.load(path).check_compatible(identity)


@pytest.mark.parametrize("missing", ["image_threshold", "pixel_threshold"])
def test_one_threshold_may_be_undefined(missing: str, identity, tmp_path: Path) -> None:
    thresholds = {"image_threshold": 0.4, "pixel_threshold": 0.6, missing: None}
    original = calib.make_calibration(identity, method=calib.METHOD_F1, n_images=5, **thresholds)
    path = original.save(tmp_path / "calibration.json")
    data = json.loads(path.read_text())
    assert data[missing] is None and "null" in path.read_text()
    assert calib.load(path) == original and getattr(calib.load(path), missing) is None
    path.write_text(json.dumps({**data, "image_threshold": None, "pixel_threshold": None}))
    with pytest.raises(ValueError, match=r"calibration\.json.*both null"):
        calib.load(path)
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\].*nan"):
        calib.make_calibration(identity, method=calib.METHOD_F1, n_images=5, **{**thresholds, missing: math.nan})


def test_load_errors_name_the_file(tmp_path: Path, tiny_model) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.json"):
        calib.load(tmp_path / "nothing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        calib.load(bad)
    bad.write_text(json.dumps({"image_threshold": 0.5}))
    with pytest.raises(ValueError, match=r"bad\.json is not a vip2clip calibration"):
        calib.load(bad)
    good = calib.make_calibration(
        PredictorIdentity(ModelIdentity.of(tiny_model)),
        image_threshold=0.5,
        pixel_threshold=0.5,
        method=calib.METHOD_F1,
        n_images=3,
    ).to_dict()
    bad.write_text(json.dumps({key: value for key, value in good.items() if key != "model"}))
    with pytest.raises(ValueError, match=r"bad\.json.*lacks.*model"):
        calib.load(bad)
    bad.write_text(json.dumps({**good, "method": "guess"}))
    with pytest.raises(ValueError, match=r"bad\.json.*unknown calibration method"):
        calib.load(bad)
    bad.write_text(json.dumps({**good, "image_threshold": "high"}))
    with pytest.raises(ValueError, match=r"bad\.json.*image_threshold"):
        calib.load(bad)


def test_check_compatible(tiny_model, checkpoint: Path, identity, tmp_path: Path) -> None:
    calibration = calib.make_calibration(
        identity, image_threshold=0.5, pixel_threshold=0.5, method=calib.METHOD_F1, n_images=3
    )
    calibration.check_compatible(identity)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    calibration.check_compatible(PredictorIdentity(ModelIdentity.of(tiny_model, copy)))  # same bytes elsewhere: fine

    other_model = vip2clip.create_model("tiny", image_size=tiny_model.config.image_size, seed=5, top_k=4)
    other = save_checkpoint(tmp_path / "other.pt", other_model.config, state=other_model.trainable_state_dict())
    with pytest.raises(ValueError, match=r"checkpoint: calibrated with .*checkpoint\.pt"):
        calibration.check_compatible(PredictorIdentity(ModelIdentity.of(other_model, other)))
    with pytest.raises(ValueError, match="model uses no checkpoint"):
        calibration.check_compatible(PredictorIdentity(ModelIdentity.of(tiny_model)))

    def altered(**changes) -> calib.Calibration:
        return dataclasses.replace(
            calibration, identity=identity.with_model(dataclasses.replace(identity.model, **changes))
        )

    with pytest.raises(ValueError, match="backbone: calibrated with 'ViT-B-16'"):
        altered(backbone="ViT-B-16").check_compatible(identity)
    with pytest.raises(ValueError, match="image size: calibrated with 999"):
        altered(image_size=999).check_compatible(identity)
    with pytest.raises(ValueError, match=r"sigma: calibrated with 2\.5, model uses 8\.0"):
        altered(sigma=2.5).check_compatible(identity)
    with pytest.raises(ValueError, match="top_k: calibrated with 50, model uses 4"):
        altered(top_k=50).check_compatible(identity)
    altered(top_k=None, sigma=None).check_compatible(identity)  # old files
    with pytest.raises(ValueError, match="CLIP weights differ"):
        altered(fingerprint="0" * 16).check_compatible(identity)
