"""Pixel metrics by default equal the authors' `test.py` computation on float32 maps, also for near-flat maps
(issue 22: the former float16 default tied every pixel of such maps and moved the table by up to 31 points)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.evaluate import collect_class_outputs
from vip2clip.evaluation.results import EvalConfig
from vip2clip.evaluation.tally import class_metrics
from vip2clip.metrics import UndefinedMetricWarning
from vip2clip.outputs import ImageBatch
from vip2clip.testing.metric_oracles import naive_aupro_cflow  # the literal loop of the release's metrics.py

SIZE = 64


class NearFlatMaps:
    """An inference engine whose maps are 0.5 plus ~1e-4 of the image's brightness and of noise: what random or
    barely trained weights give (the maps of a random ViT-L/14@336 span ~1e-3)."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.maps: list[np.ndarray] = []

    def predict(self, images: torch.Tensor) -> ImageBatch:
        brightness = torch.nn.functional.interpolate(images.mean(1, keepdim=True), size=(SIZE, SIZE))[:, 0]
        noise = torch.randn(brightness.shape, generator=self.generator)
        maps = 0.5 + 1e-4 * (brightness + noise)
        self.maps.append(maps.numpy())
        return ImageBatch(maps.mean(dim=(1, 2)), maps)


def release_pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """Independent float32 computation as the release's metrics.py does it (sklearn, the cflow loop)."""
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    f1 = 2 * precision * recall / (precision + recall + 1e-8)
    return {
        "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel()),
        "pixel_aupro": naive_aupro_cflow(masks, maps),
        "pixel_f1": float(np.max(f1[np.isfinite(f1)])),
    }


def test_near_flat_maps_give_the_release_pixel_metrics_by_default(tmp_path: Path) -> None:
    index = generate_benchmark(tmp_path, classes=1, seed=5, image_size=48, n_train_good=0, n_test_good=3,
                               n_test_defect=5)  # fmt: skip
    dataset = AnomalyDataset(index, "test", classes=index.classes(), image_size=SIZE)
    engine = NearFlatMaps()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndefinedMetricWarning)  # every pixel metric must be defined
        result = class_metrics("c", collect_class_outputs(engine, dataset, config=EvalConfig(batch_size=3)))
    maps = np.concatenate(engine.maps)
    assert maps.dtype == np.float32 and np.ptp(maps) < 2e-3  # near-flat: a few float16 steps wide
    masks = np.stack([dataset[i]["mask"].numpy() > 0.5 for i in range(len(dataset))])
    expected = release_pixel_metrics(masks, maps)
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert 0.55 < expected["pixel_auroc"] < 1.0  # the maps do separate the defects a little
