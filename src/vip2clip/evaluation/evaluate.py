"""Batched, gradient-free evaluation of a dataset split with the community protocol (paper Sec. 4, Tables 1-2).

Per class: image AUROC / AP / max-F1 of the image scores and pixel AUROC / AUPRO / max-F1 of the anomaly maps at
the model's input size (518 px by default, as the release), via `vip2clip.metrics.compute_all`; the dataset row is
the mean of the class values (classes where a metric is undefined are left out of that metric's mean).

Memory: classes are evaluated one at a time; each batch's maps (float32 by default, `EvalConfig.map_dtype`) are
reduced at once to the mergeable pixel statistics of `vip2clip.metrics.PixelStats` and merged batch by batch
(`PixelStatsAccumulator`): the normal pixels' scores in a few sorted runs and the defect pixels, 4 bytes per normal
pixel for float32 (1.0 GiB for a 1,000-image class at 518 px), which give the authors' pixel metrics exactly.
`map_dtype="float16"` rounds the maps first (about three significant digits: scores closer than ~5e-4 near 0.5
tie, which changes the metrics of maps with a narrow spread); its statistics are then counts per float16 value,
a few hundred kB per class. A class's maps are kept only when panels are drawn (in map_dtype, with bool masks).

Several ranks (`world`, under torchrun) each run the model over a contiguous share of every class, in the batches
one process forms, and rank 0 merges their scores and pixel statistics: the metrics, thresholds and per-image
scores are those of one process, in the same order. Panels are drawn by the rank that holds the image.

Which metrics a class gets follows from its labels and masks (the medical sets work this way):
- normal and anomalous images, with masks: all six;
- no masks at all (HeadCT, BrainMRI, Br35H): image metrics only, pixel metrics NaN;
- anomalous images only, with masks (ISIC, CVC, Kvasir): pixel metrics only, image metrics NaN;
- anomalous images without a mask in a class that has masks: left out of the pixel metrics (with a warning, and
  counted per class as `n_without_mask` in results.json), since an all-zero mask would count their defects as
  normal pixels; they still count for the image metrics.

A model whose scores or maps hold NaN or infinity (a broken checkpoint) is refused: `evaluate` raises
ValueError naming the class and the files, no metrics are computed from such values.

The F1-optimal thresholds for a calibration file are computed over the whole dataset (all classes pooled), image
scores exactly and pixel scores from a histogram of the float16-rounded values, so no class's maps need to be
kept; per-class optima are reported too.

Tiling (`EvalConfig.tiling`) and reference images (`EvalConfig.shots`, the few-shot protocol) change how a class is
scored, not what is measured: see `vip2clip.evaluation.scoring`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.data.index import DatasetIndex
from vip2clip.evaluation.cached import SplitFeatures
from vip2clip.evaluation.panels import PanelSpool, panel_order
from vip2clip.evaluation.results import (
    MAP_DTYPES,
    ClassBatch,
    ClassResult,
    EvalConfig,
    EvaluationResult,
    mean_metrics,
)
from vip2clip.evaluation.scoring import (
    Batch,
    check_mutual_classes,
    choose_shots,
    class_engine,
    class_share,
    tiled_batches,
)
from vip2clip.inference.predictor import InferenceEngine
from vip2clip.metrics import (
    PixelF1Histogram,
    PixelStats,
    PixelStatsAccumulator,
    UndefinedMetricWarning,
    best_f1_threshold,
    compute_all,
    pixel_metrics,
)
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.progress import Progress, silent

logger = logging.getLogger(__name__)


def _pixel_rows(dataset: AnomalyDataset) -> np.ndarray:
    """[N] bool: normal images and anomalous images with a mask (the images the pixel metrics can use)."""
    return np.array([not s.anomaly or bool(s.mask_path) for s in dataset.samples], dtype=bool)


def _predicted_batches(
    model: InferenceEngine,
    dataset: AnomalyDataset,
    config: EvalConfig,
    progress: Progress,
    rows: range,
    features: SplitFeatures | None = None,
) -> Iterator[Batch]:
    """(rows, scores [B], maps [B, S, S], masks bool [B, S, S]) per batch of the readable images among `rows`."""
    if features is not None:
        yield from features.batches(model, dataset, config.batch_size, progress, rows)
        return
    if config.tiling is not None or config.mutual is not None:
        yield from tiled_batches(model, dataset, config.tiling, config.batch_size, progress, rows, config.mutual)
        return
    loader = DataLoader(
        Subset(dataset, rows), batch_size=config.batch_size, num_workers=config.num_workers, collate_fn=collate_items
    )
    for batch in progress(loader, total=len(loader), desc=dataset.samples[0].cls_name if len(dataset) else ""):
        if batch is None:  # every image of the batch was unreadable (skip_bad)
            continue
        prediction = model.predict(batch["image"])
        scores, maps = prediction.pred_score.float().cpu().numpy(), prediction.anomaly_map.float().cpu().numpy()
        yield batch["index"].numpy(), scores, maps, batch["mask"].numpy() > 0.5


def collect_class_outputs(
    model: InferenceEngine,
    dataset: AnomalyDataset,
    config: EvalConfig,
    progress: Progress = silent,
    rows: range | None = None,
    keep_maps: bool | None = None,
    features: SplitFeatures | None = None,
) -> ClassBatch:
    """Run the model (or any inference engine) over one class's dataset (only `rows` of it when given: a rank's
    share, whole batches). Maps and masks are kept when `keep_maps` (default: when panels are wanted)."""
    rows = range(len(dataset)) if rows is None else rows
    n, size, dtype = len(rows), dataset.image_size, MAP_DTYPES[config.map_dtype]
    usable = _pixel_rows(dataset)
    has_masks = any(s.anomaly and s.mask_path for s in dataset.samples)
    keep_maps = config.panels_dir is not None if keep_maps is None else keep_maps
    maps = np.empty((n, size, size), dtype=dtype) if keep_maps else None
    masks = np.zeros((n, size, size), dtype=bool) if keep_maps else None
    scores = np.zeros(n, dtype=np.float32)
    done = np.zeros(n, dtype=bool)
    pixel = PixelStatsAccumulator()
    for positions, batch_scores, batch_maps, batch_masks in _predicted_batches(
        model, dataset, config, progress, rows, features
    ):
        local = positions - rows.start
        scores[local] = batch_scores
        done[local] = True
        _refuse_non_finite(scores[local], batch_maps, positions, dataset)
        stored = batch_maps.astype(dtype)
        if maps is not None:
            maps[local], masks[local] = stored, batch_masks
        if has_masks:
            counted = usable[positions]
            if counted.any():
                pixel.add(PixelStats.of(batch_masks[counted], stored[counted]))
    kept = np.flatnonzero(done)
    compact = kept.size < n  # rows of images that failed to decode are dropped (a copy, rare)
    positions = np.arange(rows.start, rows.stop)[kept]
    return ClassBatch(
        pred_score=scores[kept],
        gt_label=np.array(dataset.labels, dtype=np.int64)[positions],
        anomaly_map=maps[kept] if compact and maps is not None else maps,
        gt_mask=masks[kept] if compact and masks is not None else masks,
        pixel_rows=(usable & has_masks)[positions],
        positions=positions,
        pixel=pixel.result() if not pixel.empty else None,
    )


def _refuse_non_finite(scores: np.ndarray, maps: np.ndarray, rows: np.ndarray, dataset: AnomalyDataset) -> None:
    """ValueError naming the files when a batch's scores [B] or maps [B, S, S] (dataset rows [B]) hold NaN or
    infinity."""
    bad = ~np.isfinite(scores) | ~np.isfinite(maps).reshape(len(maps), -1).all(axis=1)
    if bad.any():
        names = [dataset.paths(dataset.samples[row])[0] for row in rows[bad]]
        cls_name = dataset.samples[0].cls_name
        raise ValueError(
            f"class {cls_name}: the model produced NaN or infinite scores or maps for {', '.join(names[:5])}"
            f"{f' and {len(names) - 5} more' if len(names) > 5 else ''}; no metrics computed from them: the "
            "checkpoint or CLIP weights are probably broken"
        )


def class_metrics(name: str, outputs: ClassBatch) -> ClassResult:
    """The six metrics of one class with its own F1-optimal thresholds; see the module docstring for which
    metrics are defined."""
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
    return ClassResult(name, n_normal, n_anomalous, metrics, image_threshold, pixel_threshold, without_mask)


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


class _Tally:
    """What rank 0 accumulates over the classes: their results, the pooled scores and pixel histogram for the
    dataset-level thresholds, the skipped files and the per-image scores."""

    def __init__(self) -> None:
        self.results: list[ClassResult] = []
        self.histogram = PixelF1Histogram()
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.skipped: list[tuple[str, str]] = []
        self.image_scores: list[tuple[str, str, int, float]] = []

    def add(self, name: str, dataset: AnomalyDataset, merged: ClassBatch, reported: list[tuple[str, str]]) -> None:
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

    def result(self, index: DatasetIndex, split: str, shots: dict[str, list[Path]]) -> EvaluationResult:
        """The dataset's result: the classes, their mean and the thresholds F1-optimal over all classes pooled."""
        if not self.results:
            raise ValueError(f"{index.root}: no readable image in split {split!r}")
        labels = np.concatenate(self.labels)
        image_threshold = math.nan
        if 0 < labels.sum() < labels.size:
            image_threshold = best_f1_threshold(labels, np.concatenate(self.scores))[1]
        references = {name: [str(path) for path in paths] for name, paths in shots.items()}
        return EvaluationResult(
            self.results,
            mean_metrics(self.results),
            image_threshold,
            self.histogram.best()[1],
            self.skipped,
            references,
            self.image_scores,
        )


def _classes_to_evaluate(index: DatasetIndex, config: EvalConfig) -> list[str]:
    """The classes of the split (or config.classes); ValueError for an unknown class, an empty split or (mutual
    scoring) a class of fewer than 3 images, before any work."""
    classes = list(config.classes) if config.classes else index.classes(config.split)
    index.samples(config.split, classes)
    if not classes:
        raise ValueError(f"{index.root}: split {config.split!r} has no images")
    if config.mutual is not None:
        check_mutual_classes(index, config.split, classes)
    return classes


def _evaluate_class(
    engine: InferenceEngine,
    dataset: AnomalyDataset,
    config: EvalConfig,
    progress: Progress,
    world: World,
    features: SplitFeatures | None = None,
    position: int = 0,
) -> tuple[ClassBatch, ClassBatch | None, list[tuple[str, str]]]:
    """Score this rank's share of one class (the `position`-th; from the cached `features` when given): (its
    outputs, every rank's outputs merged (rank 0; None on the others), the files every rank skipped)."""
    share = class_share(world, len(dataset), config.batch_size, config.mutual is not None, position)
    outputs = collect_class_outputs(engine, dataset, config, progress, share, features=features)
    reports = world.gather((replace(outputs, anomaly_map=None, gt_mask=None), list(dataset.skipped)))
    if not world.is_main:
        return outputs, None, []
    return outputs, ClassBatch.merge([part for part, _ in reports]), [item for _, items in reports for item in items]


@torch.no_grad()
def evaluate(
    model: ViP2CLIP,
    index: DatasetIndex,
    config: EvalConfig | None = None,
    progress: Progress = silent,
    world: World = LOCAL,
) -> EvaluationResult:
    """Evaluate `model` on a split of `index`, one class at a time (see the module docstring).

    Args:
        model: the model to evaluate.
        index: the dataset (`vip2clip.data.index.DatasetIndex`, e.g. from `vip2clip convert` or
            `vip2clip.data.synthetic.generate_benchmark`).
        config: split, classes, batch size, map dtype, panels, tiling, few-shot references (`EvalConfig`).
        progress: a progress callable (`vip2clip.utils.progress`; silent by default).
        world: the process group under torchrun (every rank calls this; all get the result).

    Returns:
        The per-class metrics, their mean, the dataset-level F1-optimal thresholds, skipped files and per-image
        scores (`EvaluationResult`).

    Raises:
        ValueError: an unknown class, a split without images or without a readable one, fewer normal train images
            than `config.shots`, or NaN/infinite scores or maps (naming the files).

    Example:
        >>> import tempfile, vip2clip
        >>> from vip2clip.data.synthetic import generate_benchmark
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     index = generate_benchmark(folder, classes=1, image_size=64, n_test_good=2, n_test_defect=2)
        ...     result = evaluate(vip2clip.create_model("tiny", image_size=64, seed=0), index)
        >>> len(result.classes), result.n_images, sorted(result.mean) == sorted(result.classes[0].metrics)
        (1, 4, True)
    """
    config = config or EvalConfig()
    classes = _classes_to_evaluate(index, config)
    shots = choose_shots(index, classes, config.shots, config.seed) if config.shots else {}
    identity = ModelIdentity.of(model) if shots else None  # keys the reference memories (no checkpoint needed)
    tally = _Tally()
    panels = PanelSpool(config.panels_dir, config.max_panels) if config.panels_dir is not None else None
    cached = config.feature_cache and config.mutual is None  # mutual scoring needs every image's patch tokens
    features = SplitFeatures.open(model, index, config, progress, world) if cached else None
    for position, name in enumerate(classes):
        dataset = AnomalyDataset(index, config.split, [name], model.config.image_size, config.skip_bad)
        engine = class_engine(
            model, identity, shots.get(name), config.tiling, config.batch_size, config.reference_cache
        )
        outputs, merged, reported = _evaluate_class(engine, dataset, config, progress, world, features, position)
        if merged is not None:
            tally.add(name, dataset, merged, reported)
        if panels is not None:  # chosen over the whole class; each rank spools the ones it holds
            chosen = merged.positions[panel_order(merged.gt_label, config.max_panels)].tolist() if merged else None
            panels.add(dataset, outputs, world.broadcast(chosen))
    result = world.broadcast(tally.result(index, config.split, shots) if world.is_main else None)
    if panels is not None:  # drawn now: they show the decisions at the dataset's thresholds
        panels.write(result.image_threshold, result.pixel_threshold, model.config.image_size)
    return result
