"""Rank 0's side of `evaluate`: one class's metrics from its merged outputs (`class_metrics`: which metrics a class
gets follows from its labels and masks, see `vip2clip.evaluation.evaluate`) and the dataset's tally over the classes
(`Tally`: the results, the pooled scores and pixel histogram for the dataset-level thresholds, the skipped files and
the per-image scores)."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.index import DatasetIndex
from vip2clip.evaluation.results import ClassBatch, ClassResult, EvaluationResult, mean_metrics
from vip2clip.metrics import PixelF1Histogram, UndefinedMetricWarning, best_f1_threshold, compute_all, pixel_metrics

logger = logging.getLogger(__name__)


def class_metrics(name: str, outputs: ClassBatch) -> ClassResult:
    """The six metrics of one class with its own F1-optimal thresholds (which metrics are defined: see the module
    docstring of `vip2clip.evaluation.evaluate`)."""
    labels, scores = outputs.gt_label, outputs.pred_score
    n_anomalous = int(labels.sum())
    n_normal = int(labels.size - n_anomalous)
    both_labels = n_normal > 0 and n_anomalous > 0
    pixel = outputs.pixel_rows
    without_mask = int((~pixel).sum()) if pixel.any() else 0  # in a class with masks: mask-less anomalous images
    if without_mask:
        logger.warning(
            "%s: %d anomalous image(s) have no mask; they are left out of the pixel metrics", name, without_mask
        )
    only = "anomalous" if n_normal == 0 else "normal"
    if not both_labels and not pixel.any():
        logger.warning("%s: only %s images and no masks: every metric is undefined", name, only)
    elif not both_labels:
        logger.warning(
            "class %s: image_auroc, image_ap and image_f1 are undefined (only %s images, one label): '-' "
            "in the tables, left out of the means",
            name,
            only,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UndefinedMetricWarning)
        metrics = compute_all(labels, scores) if both_labels else compute_all(None, None)
        if outputs.pixel is not None:  # from the pixel rows' statistics: they may be fewer than the images
            metrics.update(pixel_metrics(outputs.pixel))
    _say_undefined(name, caught)
    image_threshold = best_f1_threshold(labels, scores)[1] if both_labels else math.nan
    pixel_threshold = outputs.histogram.best()[1]
    return ClassResult(
        name=name,
        n_normal=n_normal,
        n_anomalous=n_anomalous,
        metrics=metrics,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        n_without_mask=without_mask,
    )


def _say_undefined(name: str, caught: list[warnings.WarningMessage]) -> None:
    """One sentence per undefined metric (class, metric, why), instead of the warning's file and line; other
    warnings are passed on as they came."""
    for warning in caught:
        if not issubclass(warning.category, UndefinedMetricWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        why = str(warning.message).removesuffix("; returning NaN")
        logger.warning("class %s: %s: '-' in the tables, left out of the means", name, why)


def _skipped(dataset: AnomalyDataset, outputs: ClassBatch, reported: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The files reported skipped (every rank's dataset.skipped), once each, plus images that failed to decode in a
    DataLoader worker (whose record stays there)."""
    listed = list(dict.fromkeys(reported))
    known = {path for path, _ in listed}
    for i in sorted(set(range(len(dataset))) - set(outputs.positions.tolist())):
        path = os.path.abspath(dataset.index.resolve(dataset.samples[i].img_path))
        if path not in known:
            listed.append((path, "cannot decode the image (in a DataLoader worker)"))
    return listed


def _image_scores(name: str, dataset: AnomalyDataset, outputs: ClassBatch) -> list[tuple[str, str, int, float]]:
    """(class, image path as in the index, label, pred_score) per evaluated image, in dataset order."""
    rows = zip(outputs.positions, outputs.gt_label, outputs.pred_score, strict=True)
    return [(name, dataset.samples[int(p)].img_path, int(label), float(score)) for p, label, score in rows]


class Tally:
    """What rank 0 accumulates over the classes: their results, the pooled scores and pixel histogram for the
    dataset-level thresholds, the skipped files and the per-image scores."""

    def __init__(self) -> None:
        self.results: list[ClassResult] = []
        self.histogram = PixelF1Histogram()
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.skipped: list[tuple[str, str]] = []
        self.image_scores: list[tuple[str, str, int, float]] = []

    def add(self, name: str, dataset: AnomalyDataset, *, merged: ClassBatch, reported: list[tuple[str, str]]) -> None:
        """One class's merged outputs (every rank's share) and the files every rank skipped."""
        self.skipped += _skipped(dataset, merged, reported)
        if merged.gt_label.size == 0:
            logger.warning("%s: no readable image; class left out", name)
            return
        self.results.append(class_metrics(name, merged))
        self.histogram.merge(merged.histogram)
        self.scores.append(merged.pred_score)
        self.labels.append(merged.gt_label)
        self.image_scores += _image_scores(name, dataset, merged)
        logger.info("%s: %s", name, ", ".join(f"{k} {100 * v:.1f}" for k, v in self.results[-1].metrics.items()))

    def result(self, index: DatasetIndex, *, split: str, shots: dict[str, list[Path]]) -> EvaluationResult:
        """The dataset's result: the classes, their mean and the thresholds F1-optimal over all classes pooled."""
        if not self.results:
            raise ValueError(f"{index.root}: no readable image in split {split!r}")
        labels = np.concatenate(self.labels)
        image_threshold = math.nan
        if 0 < labels.sum() < labels.size:
            image_threshold = best_f1_threshold(labels, np.concatenate(self.scores))[1]
        references = {name: [str(path) for path in paths] for name, paths in shots.items()}
        return EvaluationResult(
            classes=self.results,
            mean=mean_metrics(self.results),
            image_threshold=image_threshold,
            pixel_threshold=self.histogram.best()[1],
            skipped=self.skipped,
            references=references,
            image_scores=self.image_scores,
        )
