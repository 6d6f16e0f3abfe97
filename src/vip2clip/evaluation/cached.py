"""Evaluation from the frozen-feature cache: the image encoder runs once per image for any number of models.

The image encoder is frozen, so every model built on the same backbone, weights, image size and layers sees the
same features of an image. A study (`vip2clip.paper.study`) trains and tests many such models; with
`EvalConfig.feature_cache` set, `evaluate` reads a split's features from the training loop's feature cache
(`vip2clip.features.feature_cache`, built on the first use: the whole split, all classes, so that the very cache a
training run on this split built serves its evaluation too) and runs only the trainable heads. The scores and
maps are those of `model.predict` on the cached features: with the default float16 cache they differ from an
evaluation that encodes the images by the features' rounding (about 1e-3 relative), as training does.

Tiling and reference images need the encoder on other inputs than the cached ones: they are refused here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.index import DatasetIndex
from vip2clip.evaluation.class_scoring import Batch
from vip2clip.features.feature_cache import FeatureCache, load_or_build_cache
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.progress import Progress
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

if TYPE_CHECKING:
    from vip2clip.evaluation.results import EvalConfig


class SplitFeatures:
    """The cached features of one split of an index, read class by class."""

    def __init__(self, cache: FeatureCache, rows: dict[str, int]) -> None:
        self.cache = cache
        self.rows = rows  # absolute image path -> row of the cache
        self.failed = {row for row, _, _ in cache.failed}

    @classmethod
    def open(
        cls, model: ViP2CLIP, index: DatasetIndex, *, config: EvalConfig, run: RunContext = LOCAL_RUN
    ) -> SplitFeatures:
        """Open (or build) the cache of `index`'s `config.split` at the model's image size in
        `config.feature_cache`, stored as `config.cache_dtype`."""
        if config.tiling is not None or config.shots:
            raise ValueError("evaluating from the feature cache cannot tile or use reference images")
        dataset = AnomalyDataset(
            index, config.split, classes=None, image_size=model.config.image_size, skip_bad=config.skip_bad
        )
        cache = load_or_build_cache(
            model,
            dataset,
            directory=config.feature_cache,
            dtype=config.cache_dtype,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            run=run,
        )
        return cls(cache, {dataset.paths(sample)[0]: row for row, sample in enumerate(dataset.samples)})

    def batches(
        self, model: ViP2CLIP, dataset: AnomalyDataset, *, batch_size: int, progress: Progress, rows: range
    ) -> Iterator[Batch]:
        """(positions, scores [B], maps [B, S, S], masks bool [B, S, S]) of `rows` of one class's dataset, from
        the cache; images the cache could not decode are left out (and listed in `dataset.skipped`)."""
        device = next(model.parameters()).device
        size = (dataset.image_size, dataset.image_size)
        starts = range(rows.start, rows.stop, batch_size)
        for start in progress(starts, total=len(starts), desc=dataset.samples[0].cls_name if len(dataset) else ""):
            positions, cached = [], []
            for position in range(start, min(start + batch_size, rows.stop)):
                path = dataset.paths(dataset.samples[position])[0]
                row = self.rows.get(path)
                if row is None:
                    raise ValueError(f"{path} is not in the feature cache {self.cache.directory} of its split")
                if row in self.failed:
                    dataset.skipped.append((path, "could not be decoded (feature cache)"))
                    continue
                positions.append(position)
                cached.append(row)
            if not cached:
                continue
            with torch.no_grad():
                output = model.forward_features(self.cache.features(cached, device))
                prediction = model.prediction_from_output(output, size)
            yield (
                np.array(positions),
                prediction.pred_score.float().cpu().numpy(),
                prediction.anomaly_map.float().cpu().numpy(),
                self.cache.masks(cached).numpy() > 0.5,
            )
