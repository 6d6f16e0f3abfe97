"""The output family (`vip2clip.outputs`): what every engine, the predictor and the evaluator return, checked when
made."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import vip2clip
from vip2clip.evaluation.results import ClassBatch
from vip2clip.inference.predictor import Predictor, make_result
from vip2clip.inference.thresholds import Thresholds
from vip2clip.outputs import ImageBatch, ImageItem


def test_a_batch_of_tensors_or_arrays_checks_its_shapes() -> None:
    batch = ImageBatch(torch.tensor([0.2, 0.9]), torch.zeros(2, 4, 6))
    scores, maps = batch.numpy()
    assert scores.dtype == maps.dtype == np.float32 and maps.shape == (2, 4, 6) and len(batch) == 2
    items = list(ImageBatch(np.array([0.2, 0.9]), np.ones((2, 4, 6)), pred_mask=np.ones((2, 4, 6), bool)))
    assert [item.pred_score for item in items] == pytest.approx([0.2, 0.9])
    assert items[1].anomaly_map.shape == (4, 6) and items[1].pred_mask.all() and items[1].size == (6, 4)
    with pytest.raises(ValueError, match=r"pred_score must be \[B\]"):
        ImageBatch(np.zeros((2, 1)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"anomaly_map must be \[2, H, W\]"):
        ImageBatch(np.zeros(2), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match=r"gt_label must be \[2\]"):
        ImageBatch(np.zeros(2), np.zeros((2, 4, 4)), gt_label=np.zeros(3))
    with pytest.raises(ValueError, match="gt_mask must be boolean"):
        ImageBatch(np.zeros(2), np.zeros((2, 4, 4)), gt_mask=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match=r"pred_mask has shape \(2, 4, 5\), the anomaly map \(2, 4, 4\)"):
        ImageBatch(np.zeros(2), np.zeros((2, 4, 4)), pred_mask=np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError, match="holds no anomaly maps"):
        ImageBatch(np.zeros(2)).numpy()


def test_an_item_checks_its_map_mask_and_label() -> None:
    item = ImageItem(
        pred_score=0.7, anomaly_map=np.full((3, 5), 0.4, np.float32), pred_label=True,
        pred_mask=np.eye(3, 5, dtype=bool), image_threshold=0.5, pixel_threshold=0.3,
    )  # fmt: skip
    assert item.is_anomalous and item.is_judged and item.size == (5, 3)
    assert item.max_pixel_score == pytest.approx(0.4) and item.defect_area == pytest.approx(3 / 15)
    assert item == item and item != ImageItem(0.7, item.anomaly_map)  # by identity: arrays have no truth value
    assert repr(item).startswith("ImageItem(pred_score=0.7, pred_label=True, image_threshold=0.5")
    unread = ImageItem(source="a.png", error="not an image")
    assert not unread.is_judged and math.isnan(unread.pred_score) and math.isnan(unread.defect_area)
    with pytest.raises(ValueError, match=r"anomaly_map must be \[H, W\]"):
        ImageItem(0.1, np.zeros((1, 3, 5)))
    for word in ("anomalous", "normal", 1):  # the words are `verdict`'s; 1 is not anomalib's boolean either
        with pytest.raises(ValueError, match=r"pred_label must be True \(anomalous\), False \(normal\) or None"):
            ImageItem(pred_score=0.1, anomaly_map=np.zeros((3, 5)), pred_label=word)
    with pytest.raises(ValueError, match="an image that could not be judged has no pred_label"):
        ImageItem(pred_score=0.1, anomaly_map=np.zeros((3, 5)), pred_label=False, error="NaN")
    with pytest.raises(ValueError, match="pred_mask must be boolean"):
        ImageItem(pred_score=0.1, anomaly_map=np.zeros((3, 5)), pred_label=False, pred_mask=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="pred_mask without an anomaly_map"):
        ImageItem(pred_score=0.1, pred_label=False, pred_mask=np.zeros((3, 5), bool))


def test_pred_label_is_anomalibs_boolean_and_verdict_the_files_word() -> None:
    thresholds = Thresholds(0.5, 0.5, "t")
    normal = make_result(0.2, np.zeros((2, 2)), thresholds=thresholds)
    anomalous = make_result(0.9, np.ones((2, 2)), thresholds=thresholds)
    broken = make_result(math.nan, np.zeros((2, 2)), thresholds=thresholds)
    assert normal.pred_label is False and anomalous.pred_label is True and broken.pred_label is None
    flagged = [name for name, item in (("normal", normal), ("anomalous", anomalous)) if item.pred_label]
    assert flagged == ["anomalous"]  # `if item.pred_label:` as with anomalib's batches
    assert broken.error and "NaN or infinite" in broken.error and not broken.is_anomalous
    assert (normal.verdict, anomalous.verdict, broken.verdict) == ("normal", "anomalous", "error")
    assert ImageItem(pred_score=0.2, anomaly_map=np.zeros((2, 2))).verdict is None  # scored, not decided
    assert ImageItem(source="a.png", error="not an image").verdict == "error"
    numpy_decision = np.float32(0.9) >= 0.5
    assert ImageItem(pred_score=0.9, pred_label=numpy_decision).pred_label is True  # numpy's bool, as bool


def test_a_decision_keeps_the_scored_input_and_fails_closed() -> None:
    scored = ImageItem(0.8, np.zeros((4, 4), np.float32), source="part.png", self_reference=True)
    decided = make_result(0.8, np.full((6, 8), 0.7), thresholds=Thresholds(0.5, 0.6, "t"), scored=scored)
    assert (decided.source, decided.self_reference, decided.pred_label) == ("part.png", True, True)
    assert decided.pred_mask.all() and decided.defect_area == 1.0 and decided.size == (8, 6)
    assert (decided.image_threshold, decided.pixel_threshold) == (0.5, 0.6)
    broken = make_result(0.8, np.full((6, 8), np.nan), thresholds=Thresholds(0.5, 0.6, "t"), scored=scored)
    assert broken.pred_label is None and broken.verdict == "error" and not broken.is_judged
    assert not broken.pred_mask.any()
    assert math.isnan(broken.max_pixel_score) and broken.source == "part.png"


def test_the_model_the_predictor_and_the_evaluator_speak_the_family(tiny_model) -> None:
    batch = tiny_model.predict(torch.zeros(2, 3, tiny_model.config.image_size, tiny_model.config.image_size))
    assert isinstance(batch, vip2clip.ImageBatch) and batch.anomaly_map.shape[0] == 2
    predictor = Predictor(tiny_model)
    scored = next(predictor.score([np.zeros((20, 30, 3), np.uint8)]))
    assert isinstance(scored, vip2clip.ImageItem) and scored.pred_label is None
    assert scored.anomaly_map.shape == (tiny_model.config.image_size,) * 2
    decided = predictor.result(scored)
    assert decided.pred_label in (True, False) and decided.anomaly_map.shape == (20, 30)
    with pytest.raises(ValueError, match="positions must be"):
        ClassBatch(pred_score=np.zeros(2), gt_label=np.zeros(2, int), pixel_rows=np.ones(2, bool), positions=[0])
    with pytest.raises(ValueError, match="need their gt_label"):
        ClassBatch(pred_score=np.zeros(2), pixel_rows=np.ones(2, bool), positions=np.arange(2))


def test_the_output_types_load_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import vip2clip.outputs; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
