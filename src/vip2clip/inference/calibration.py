"""Decision thresholds that travel with the model they were derived for.

A `Calibration` holds an image threshold (image score >= threshold -> "anomalous") and a pixel threshold
(anomaly-map value >= threshold -> defect pixel), how they were obtained, and the identity of the model they
belong to (a `PredictorIdentity`: the model's checkpoint hash, backbone and weights fingerprint, input size, top-K,
sigma, and the predictor's tiling and reference images' rule). Scores of a different model, resolution, tiling or
fusion are on a different scale, so `check_compatible` refuses such pairs.

Thresholds are probabilities in [0, 1] (`check_threshold` refuses anything else, NaN included). Either threshold
may be None (JSON null): undefined for the data it was derived from. Image-level-only data
(no masks: HeadCT, BrainMRI, Br35H) has no pixel threshold, and data with one image label only (all anomalous:
ISIC, Kvasir, ...) no image threshold. Such a file still decides the other kind; decisions of the missing kind
need an explicit threshold (`vip2clip predict --threshold` / `--pixel-threshold`), see
`vip2clip.inference.thresholds.resolve_thresholds`.

Two ways to obtain thresholds:
- "f1-optimal on labelled images": `vip2clip test` picks the thresholds that maximise image and pixel F1 on a
  labelled test set (see `make_calibration`).
- "normal-quantile": `calibrate_from_normal` needs only defect-free images. The image threshold is the
  `image_quantile` (default 0.99) quantile of their image scores and the pixel threshold the `pixel_quantile`
  (default 0.999) quantile of all their pixel scores pooled, i.e. about 1 % of normal images and 0.1 % of
  normal pixels would be flagged. With few images the high quantiles are close to the maximum and noisy,
  hence a warning below `MIN_NORMAL_IMAGES`.

File format 2 holds the identity as a "model" record (`Calibration.identity`); files of format 1 (flat
checkpoint/backbone fields) are read.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vip2clip.inference.identity import PredictorIdentity
from vip2clip.metrics.threshold import (
    DEFAULT_IMAGE_QUANTILE,
    DEFAULT_PIXEL_QUANTILE,
    StreamingQuantile,
    normal_quantile_thresholds,
)
from vip2clip.utils.fileio import atomic_write_json

FORMAT = "vip2clip-calibration"
FORMAT_VERSION = 2
METHOD_F1 = "f1-optimal on labelled images"
METHOD_NORMAL = "normal-quantile"
METHODS = (METHOD_F1, METHOD_NORMAL)
# Below this many normal images a 0.99 quantile is essentially the maximum of a small sample.
MIN_NORMAL_IMAGES = 20
# Format 1 kept the identity in flat fields; their names in a ModelIdentity.
_V1_IDENTITY_FIELDS = {
    "checkpoint": "checkpoint",
    "checkpoint_sha256": "checkpoint_sha256",
    "backbone": "backbone",
    "image_size": "image_size",
    "backbone_fingerprint": "fingerprint",
    "top_k": "top_k",
    "sigma": "sigma",
}
# Field names whose key in the file differs (the file's "model" record predates the split of model and predictor).
_KEYS = {"identity": "model"}
_REQUIRED = ("image_threshold", "pixel_threshold", "method", "n_images", "created", "model")


def check_threshold(value: object, name: str) -> float:
    """`value` as a float when it is a number in [0, 1] (scores are probabilities); ValueError naming it otherwise.

    NaN would make every comparison false (everything "normal"), and a threshold above 1 or below 0 decides every
    image the same way: both are mistakes, not settings.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (scores are probabilities), got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Image and pixel decision thresholds plus the identity of the model they were computed for.

    image_threshold / pixel_threshold: None when undefined for the calibration data (see the module docstring);
        at least one is a number.
    quantile / pixel_quantile: the quantiles used by the "normal-quantile" method (None otherwise).
    identity: the `PredictorIdentity` of what produced the scores (the "model" record of the file). created:
    ISO-8601 UTC time stamp. computation: the engine and precision that computed the scores and why
    (`Predictor.computation`; recorded, not compared: bf16 and fp32 scores differ by far less than a threshold's
    sampling noise; None in files of older versions).
    """

    image_threshold: float | None
    pixel_threshold: float | None
    method: str
    n_images: int
    created: str
    identity: PredictorIdentity
    quantile: float | None = None
    pixel_quantile: float | None = None
    computation: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; expected one of {list(METHODS)}")
        for name in ("image_threshold", "pixel_threshold"):
            if getattr(self, name) is not None:
                check_threshold(getattr(self, name), f"{name} (null when undefined)")
        if self.image_threshold is None and self.pixel_threshold is None:
            raise ValueError("image_threshold and pixel_threshold are both null: the calibration decides nothing")
        if self.identity.model.image_size < 1 or self.n_images < 0:
            size = self.identity.model.image_size
            raise ValueError(f"bad calibration: image_size={size}, n_images={self.n_images}")

    def to_dict(self) -> dict[str, Any]:
        values = {_KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **values, "model": self.identity.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write the calibration as strict JSON, atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "calibration") -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{source} is not a vip2clip calibration file (no "format": {FORMAT!r})')
        version = data.get("format_version")
        if version == 1:
            data = _upgrade_v1(data, source)
        elif version != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported calibration format_version {version!r}")
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ValueError(f"{source}: calibration lacks the field(s) {missing}")
        known = {_KEYS.get(f.name, f.name): f.name for f in fields(cls)}
        values = {known[key]: value for key, value in data.items() if key in known}
        try:
            values["identity"] = PredictorIdentity.from_dict(values["identity"])
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: invalid calibration: {error}") from error

    def check_compatible(self, identity: PredictorIdentity) -> None:
        """Raise ValueError unless `identity` describes the scoring this calibration is for (see
        `PredictorIdentity.mismatches`): thresholds of another model, resolution, smoothing or tiling do not fit."""
        problems = self.identity.mismatches(identity, labels=("calibrated with", "model uses"))
        if problems:
            raise ValueError(
                "calibration does not match this model (" + "; ".join(problems) + "). Re-run `vip2clip calibrate` "
                "or `vip2clip test` with this model, or pass --threshold/--pixel-threshold instead"
            )


def _upgrade_v1(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A format-1 record (identity in flat fields) in format 2's shape."""
    missing = [key for key in ("checkpoint", "checkpoint_sha256", "backbone", "image_size") if key not in data]
    if missing:
        raise ValueError(f"{source}: calibration lacks the field(s) {missing}")
    model = {new: data[old] for old, new in _V1_IDENTITY_FIELDS.items() if old in data}
    rest = {key: value for key, value in data.items() if key not in _V1_IDENTITY_FIELDS}
    return {**rest, "model": model}


def load(path: str | Path) -> Calibration:
    """Read a calibration JSON file; every problem is a FileNotFoundError/ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    return Calibration.from_dict(data, source=str(path))


def make_calibration(
    identity: PredictorIdentity,
    *,
    image_threshold: float | None,
    pixel_threshold: float | None,
    method: str,
    n_images: int,
    quantile: float | None = None,
    pixel_quantile: float | None = None,
) -> Calibration:
    """A Calibration for the scoring `identity`, stamped now.

    `vip2clip test` calls it with method=METHOD_F1 and the F1-optimal thresholds (None where undefined).
    """
    return Calibration(
        image_threshold=_optional_float(image_threshold),
        pixel_threshold=_optional_float(pixel_threshold),
        method=method,
        n_images=int(n_images),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        identity=identity,
        quantile=quantile,
        pixel_quantile=pixel_quantile,
    )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def calibrate_from_normal(
    image_scores: Sequence[float] | np.ndarray,
    pixel_scores: Sequence[np.ndarray] | np.ndarray | StreamingQuantile,
    *,
    identity: PredictorIdentity,
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
) -> Calibration:
    """Thresholds from defect-free images: high quantiles of their image scores and of their pixel scores.

    See `vip2clip.metrics.normal_quantile_thresholds` for the rule. Warns (UserWarning) below MIN_NORMAL_IMAGES.
    """
    n_images = int(np.asarray(image_scores).size)
    if 0 < n_images < MIN_NORMAL_IMAGES:
        warnings.warn(
            f"calibrating on only {n_images} normal images (fewer than {MIN_NORMAL_IMAGES}): the "
            f"{image_quantile} quantile is close to the maximum of a small sample and the thresholds are noisy",
            UserWarning,
            stacklevel=2,
        )
    if isinstance(pixel_scores, StreamingQuantile):
        pixel_quantile = pixel_scores.q
    image_threshold, pixel_threshold = normal_quantile_thresholds(
        image_scores, pixel_scores, image_quantile=image_quantile, pixel_quantile=pixel_quantile
    )
    return make_calibration(
        identity,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        method=METHOD_NORMAL,
        n_images=n_images,
        quantile=image_quantile,
        pixel_quantile=pixel_quantile,
    )
