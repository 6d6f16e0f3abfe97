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

Several ranks (`run.world`, under torchrun) each run the model over a contiguous share of every class, in the batches
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
scored, not what is measured: see `vip2clip.evaluation.class_scoring`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.data.index import DatasetIndex
from vip2clip.evaluation.cached import SplitFeatures
from vip2clip.evaluation.class_scoring import (
    Batch,
    check_mutual_classes,
    choose_shots,
    class_engine,
    class_share,
    tiled_batches,
)
from vip2clip.evaluation.panels import PanelSpool, panel_order
from vip2clip.evaluation.results import MAP_DTYPES, ClassBatch, EvalConfig, EvaluationResult
from vip2clip.evaluation.tally import Tally
from vip2clip.inference.predictor import InferenceEngine
from vip2clip.metrics import PixelStats, PixelStatsAccumulator
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.progress import Progress, silent
from vip2clip.utils.run_context import LOCAL_RUN, RunContext


def _pixel_rows(dataset: AnomalyDataset) -> np.ndarray:
    """[N] bool: normal images and anomalous images with a mask (the images the pixel metrics can use)."""
    return np.array([not s.anomaly or bool(s.mask_path) for s in dataset.samples], dtype=bool)


def _predicted_batches(
    model: InferenceEngine,
    dataset: AnomalyDataset,
    *,
    config: EvalConfig,
    progress: Progress,
    rows: range,
    features: SplitFeatures | None = None,
) -> Iterator[Batch]:
    """(rows, scores [B], maps [B, S, S], masks bool [B, S, S]) per batch of the readable images among `rows`."""
    if features is not None:
        yield from features.batches(model, dataset, batch_size=config.batch_size, progress=progress, rows=rows)
        return
    if config.tiling is not None or config.mutual is not None:
        yield from tiled_batches(
            model,
            dataset,
            tiling=config.tiling,
            batch_size=config.batch_size,
            progress=progress,
            share=rows,
            mutual=config.mutual,
        )
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
    *,
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
        model, dataset, config=config, progress=progress, rows=rows, features=features
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


def _classes_to_evaluate(index: DatasetIndex, config: EvalConfig) -> list[str]:
    """The classes of the split (or config.classes); ValueError for an unknown class, an empty split or (mutual
    scoring) a class of fewer than 3 images, before any work."""
    classes = list(config.classes) if config.classes else index.classes(config.split)
    index.samples(config.split, classes)
    if not classes:
        raise ValueError(f"{index.root}: split {config.split!r} has no images")
    if config.mutual is not None:
        check_mutual_classes(index, split=config.split, classes=classes)
    return classes


def _evaluate_class(
    engine: InferenceEngine,
    dataset: AnomalyDataset,
    *,
    config: EvalConfig,
    run: RunContext,
    features: SplitFeatures | None = None,
    position: int = 0,
) -> tuple[ClassBatch, ClassBatch | None, list[tuple[str, str]]]:
    """Score this rank's share of one class (the `position`-th; from the cached `features` when given): (its
    outputs, every rank's outputs merged (rank 0; None on the others), the files every rank skipped)."""
    world = run.world
    share = class_share(
        world, len(dataset), batch_size=config.batch_size, mutual=config.mutual is not None, position=position
    )
    outputs = collect_class_outputs(
        engine, dataset, config=config, progress=run.progress, rows=share, features=features
    )
    reports = world.gather((replace(outputs, anomaly_map=None, gt_mask=None), list(dataset.skipped)))
    if not world.is_main:
        return outputs, None, []
    return outputs, ClassBatch.merge([part for part, _ in reports]), [item for _, items in reports for item in items]


@torch.no_grad()
def evaluate(
    model: ViP2CLIP,
    index: DatasetIndex,
    *,
    config: EvalConfig | None = None,
    run: RunContext = LOCAL_RUN,
) -> EvaluationResult:
    """Evaluate `model` on a split of `index`, one class at a time (see the module docstring).

    Args:
        model: the model to evaluate.
        index: the dataset (`vip2clip.data.index.DatasetIndex`, e.g. from `vip2clip convert` or
            `vip2clip.data.synthetic.generate_benchmark`).
        config: split, classes, batch size, map dtype, panels, tiling, few-shot references (`EvalConfig`).
        run: the progress bars and, under torchrun, the process group (`RunContext`: every rank calls this; all
            get the result; silent and one process by default).

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
    shots = choose_shots(index, classes, shots=config.shots, seed=config.seed) if config.shots else {}
    identity = ModelIdentity.of(model) if shots else None  # keys the reference memories (no checkpoint needed)
    tally = Tally()
    panels = PanelSpool(config.panels_dir, config.max_panels) if config.panels_dir is not None else None
    cached = config.feature_cache and config.mutual is None  # mutual scoring needs every image's patch tokens
    features = SplitFeatures.open(model, index, config=config, run=run) if cached else None
    world = run.world
    for position, name in enumerate(classes):
        dataset = AnomalyDataset(
            index, config.split, classes=[name], image_size=model.config.image_size, skip_bad=config.skip_bad
        )
        engine = class_engine(
            model,
            identity,
            files=shots.get(name),
            tiling=config.tiling,
            batch_size=config.batch_size,
            cache_dir=config.reference_cache,
        )
        outputs, merged, reported = _evaluate_class(
            engine, dataset, config=config, run=run, features=features, position=position
        )
        if merged is not None:
            tally.add(name, dataset, merged=merged, reported=reported)
        if panels is not None:  # chosen over the whole class; each rank spools the ones it holds
            chosen = merged.positions[panel_order(merged.gt_label, config.max_panels)].tolist() if merged else None
            panels.add(dataset, outputs, chosen=world.broadcast(chosen))
    result = world.broadcast(tally.result(index, split=config.split, shots=shots) if world.is_main else None)
    if panels is not None:  # drawn now: they show the decisions at the dataset's thresholds
        panels.write(result.image_threshold, result.pixel_threshold, model_size=model.config.image_size)
    return result
