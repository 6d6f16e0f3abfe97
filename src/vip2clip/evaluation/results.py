"""The evaluation's settings and result types: what `evaluate` takes and returns, and what the panels and reports
read (apart from the evaluator, so that they import types, not the evaluator)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from vip2clip.config import STORAGE_DTYPES
from vip2clip.metrics import METRIC_KEYS, PixelF1Histogram, PixelStats
from vip2clip.outputs import ImageBatch
from vip2clip.scoring.mutual_rule import MutualRule
from vip2clip.scoring.tiling import TileConfig

MAP_DTYPES = {name: np.dtype(name).type for name in STORAGE_DTYPES}


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How to evaluate. panels_dir: write labelled panels there (`evaluation.panels`; None: no panels);
    max_panels: at most this many per class (anomalous and normal alternately; None: all). tiling: score tile by
    tile; shots: reference images per class from the train split, drawn with `seed`, their memories cached in
    `reference_cache` (None: not on disk); mutual: each class's images score each other (see
    `vip2clip.evaluation.class_scoring`)."""

    split: str = "test"
    classes: tuple[str, ...] | None = None
    batch_size: int = 8
    num_workers: int = 0
    skip_bad: bool = False
    map_dtype: str = "float32"
    panels_dir: Path | None = None
    max_panels: int | None = None
    tiling: TileConfig | None = None
    shots: int = 0
    seed: int = 111
    reference_cache: Path | None = None
    feature_cache: Path | None = None  # read the split's encoder outputs from this cache (`evaluation.cached`)
    cache_dtype: str = "float16"
    mutual: MutualRule | None = None

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.cache_dtype not in MAP_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(MAP_DTYPES)}, got {self.cache_dtype!r}")
        if self.map_dtype not in MAP_DTYPES:
            raise ValueError(f"map_dtype must be one of {sorted(MAP_DTYPES)}, got {self.map_dtype!r}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"bad batch_size {self.batch_size} or num_workers {self.num_workers}")
        if self.max_panels is not None and self.max_panels < 0:
            raise ValueError(f"max_panels must be >= 0, got {self.max_panels}")


@dataclass(kw_only=True)
class ClassResult:
    """One class: counts of the evaluated images, the six metrics (fractions, NaN when undefined) and the
    class's own F1-optimal thresholds (NaN when undefined)."""

    name: str
    n_normal: int
    n_anomalous: int
    metrics: dict[str, float]
    image_threshold: float = math.nan
    pixel_threshold: float = math.nan
    n_without_mask: int = 0  # anomalous images left out of the pixel metrics (no mask, in a class with masks)


@dataclass(kw_only=True)
class EvaluationResult:
    """All classes, their mean, the dataset-level F1-optimal thresholds and the files that were skipped."""

    classes: list[ClassResult]
    mean: dict[str, float]
    image_threshold: float
    pixel_threshold: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    references: dict[str, list[str]] = field(default_factory=dict)  # class -> its reference images (few-shot)
    image_scores: list[tuple[str, str, int, float]] = field(default_factory=list)  # (class, image, label, pred_score)

    @property
    def n_images(self) -> int:
        return sum(c.n_normal + c.n_anomalous for c in self.classes)


@dataclass(kw_only=True, eq=False)
class ClassBatch(ImageBatch):
    """One class's outputs (or one rank's share of them), an `ImageBatch` with the truth: pred_score [N] float32,
    gt_label [N] int; anomaly_map [N, S, S] (map_dtype) and gt_mask [N, S, S] bool only when kept (panels).
    pixel_rows [N] bool: the images that count for the pixel metrics; positions [N]: each row's position in the
    class's AnomalyDataset. pixel: the pixel statistics of `pixel_rows` (None when none of them was scored);
    `histogram` holds them for the F1-optimal pixel threshold."""

    pixel_rows: np.ndarray
    positions: np.ndarray
    pixel: PixelStats | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gt_label is None:
            raise ValueError("a class's outputs need their gt_label")
        for name in ("pixel_rows", "positions"):
            if np.shape(getattr(self, name)) != (len(self),):
                raise ValueError(f"{name} must be [{len(self)}], got shape {np.shape(getattr(self, name))}")

    @cached_property
    def histogram(self) -> PixelF1Histogram:
        """The pixel statistics' counts per float16 value, for the F1-optimal pixel threshold (empty without);
        computed once (a pass over every normal score): the class's metrics and the dataset's tally both read it."""
        if self.pixel is None:
            return PixelF1Histogram()
        return self.pixel.f1_histogram()

    @classmethod
    def merge(cls, parts: list[ClassBatch]) -> ClassBatch:
        """The outputs of disjoint shares, `parts` in position order, as one (without maps: they stay where made)."""
        pixel = [part.pixel for part in parts if part.pixel is not None]
        return cls(
            pred_score=np.concatenate([part.pred_score for part in parts]),
            gt_label=np.concatenate([part.gt_label for part in parts]),
            pixel_rows=np.concatenate([part.pixel_rows for part in parts]),
            positions=np.concatenate([part.positions for part in parts]),
            pixel=PixelStats.merge(pixel) if pixel else None,
        )


def mean_metrics(results: list[ClassResult]) -> dict[str, float]:
    """Per metric, the mean over the classes where it is defined (NaN when it is defined for none)."""
    mean = {}
    for key in METRIC_KEYS:
        values = [r.metrics[key] for r in results if not math.isnan(r.metrics[key])]
        mean[key] = float(np.mean(values)) if values else math.nan
    return mean


def result_to_dict(result: EvaluationResult) -> dict[str, Any]:
    """Plain-data form (NaN kept as float NaN; the JSON writer turns it into null)."""
    return {
        "classes": [
            {
                "name": c.name,
                "n_normal": c.n_normal,
                "n_anomalous": c.n_anomalous,
                **c.metrics,
                "image_threshold": c.image_threshold,
                "pixel_threshold": c.pixel_threshold,
                "n_without_mask": c.n_without_mask,
            }
            for c in result.classes
        ],
        "mean": dict(result.mean),
        "thresholds": {"image": result.image_threshold, "pixel": result.pixel_threshold},
        "n_images": result.n_images,
        "n_without_mask": sum(c.n_without_mask for c in result.classes),
        "skipped": [{"path": path, "reason": reason} for path, reason in result.skipped],
        **({"reference_images": result.references} if result.references else {}),
    }
