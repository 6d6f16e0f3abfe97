"""Decision thresholds that travel with the model they were derived for.

A `Calibration` holds an image threshold (image score >= threshold -> "anomalous") and a pixel threshold
(anomaly-map value >= threshold -> defect pixel), how they were obtained, and the identity of the model they
belong to: checkpoint file hash, backbone name (and weights fingerprint when known) and input size. Scores
of a different model or resolution are on a different scale, so `check_compatible` refuses such pairs.

Either threshold may be None (JSON null): undefined for the data it was derived from. Image-level-only data
(no masks: HeadCT, BrainMRI, Br35H) has no pixel threshold, and data with one image label only (all anomalous:
ISIC, Kvasir, ...) no image threshold. Such a file still decides the other kind; decisions of the missing kind
need an explicit threshold (`vip2clip predict --threshold` / `--pixel-threshold`), see `predict.resolve_thresholds`.

Two ways to obtain thresholds:
- "f1-optimal on labelled images": `vip2clip test` picks the thresholds that maximise image and pixel F1 on a
  labelled test set (see `make_calibration`).
- "normal-quantile": `calibrate_from_normal` needs only defect-free images. The image threshold is the
  `image_quantile` (default 0.99) quantile of their image scores and the pixel threshold the `pixel_quantile`
  (default 0.999) quantile of all their pixel scores pooled, i.e. about 1 % of normal images and 0.1 % of
  normal pixels would be flagged. With few images the high quantiles are close to the maximum and noisy,
  hence a warning below `MIN_NORMAL_IMAGES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vip2clip.data.fileio import atomic_write_text

if TYPE_CHECKING:
    from vip2clip.model.vip2clip import ViP2CLIP

FORMAT = "vip2clip-calibration"
FORMAT_VERSION = 1
METHOD_F1 = "f1-optimal on labelled images"
METHOD_NORMAL = "normal-quantile"
METHODS = (METHOD_F1, METHOD_NORMAL)
# Below this many normal images a 0.99 quantile is essentially the maximum of a small sample.
MIN_NORMAL_IMAGES = 20
DEFAULT_IMAGE_QUANTILE = 0.99
DEFAULT_PIXEL_QUANTILE = 0.999


@dataclass(frozen=True)
class Calibration:
    """Image and pixel decision thresholds plus the identity of the model they were computed for.

    image_threshold / pixel_threshold: None when undefined for the calibration data (see the module docstring);
        at least one is a number.
    quantile / pixel_quantile: the quantiles used by the "normal-quantile" method (None otherwise).
    checkpoint / checkpoint_sha256: the trained-weights file (None for a model without a checkpoint).
    backbone_fingerprint: `model.backbone.fingerprint()` (None when unknown, then not checked).
    top_k / sigma: the inference options that change the scores (None when unknown, then not checked).
    created: ISO-8601 UTC time stamp.
    """

    image_threshold: float | None
    pixel_threshold: float | None
    method: str
    quantile: float | None
    n_images: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    backbone: str
    image_size: int
    created: str
    pixel_quantile: float | None = None
    backbone_fingerprint: str | None = None
    top_k: int | None = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; expected one of {list(METHODS)}")
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number or null (undefined), got {value!r}")
        if self.image_threshold is None and self.pixel_threshold is None:
            raise ValueError("image_threshold and pixel_threshold are both null: the calibration decides nothing")
        if self.image_size < 1 or self.n_images < 0:
            raise ValueError(f"bad calibration: image_size={self.image_size}, n_images={self.n_images}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON, atomically (temp file + rename)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "calibration") -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{source} is not a vip2clip calibration file (no "format": {FORMAT!r})')
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported calibration format_version {data.get('format_version')!r}")
        known = {f.name for f in fields(cls)}
        missing = sorted(_REQUIRED - set(data))
        if missing:
            raise ValueError(f"{source}: calibration lacks the field(s) {missing}")
        values = {key: value for key, value in data.items() if key in known}
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: invalid calibration: {error}") from error

    def check_compatible(self, model: ViP2CLIP, checkpoint_path: str | Path | None) -> None:
        """Raise ValueError unless `model` (loaded from `checkpoint_path`) is the model this calibration is for.

        Compares the checkpoint file's SHA-256, the backbone name (and weights fingerprint when recorded), the
        input size and top_k/sigma: thresholds of another model, resolution or smoothing do not fit this one.
        """
        problems = []
        digest = file_sha256(checkpoint_path) if checkpoint_path is not None else None
        if digest != self.checkpoint_sha256:
            problems.append(
                f"checkpoint: calibrated with {_describe(self.checkpoint, self.checkpoint_sha256)}, "
                f"used with {_describe(checkpoint_path, digest)}"
            )
        if model.config.backbone != self.backbone:
            problems.append(f"backbone: calibrated with {self.backbone!r}, model uses {model.config.backbone!r}")
        if self.backbone_fingerprint is not None and model.backbone.fingerprint() != self.backbone_fingerprint:
            problems.append("backbone weights: the CLIP weights differ from those used for calibration")
        if model.config.image_size != self.image_size:
            problems.append(f"image size: calibrated at {self.image_size}, model uses {model.config.image_size}")
        for option in ("top_k", "sigma"):
            recorded, used = getattr(self, option), getattr(model.config, option)
            if recorded is not None and recorded != used:
                problems.append(f"{option}: calibrated with {recorded}, model uses {used}")
        if problems:
            raise ValueError(
                "calibration does not match this model (" + "; ".join(problems) + "). Re-run `vip2clip calibrate` "
                "or `vip2clip test` with this model, or pass --threshold/--pixel-threshold instead"
            )


# Fields that must be in the JSON; the later, optional ones may be absent (then they are not checked).
_REQUIRED = frozenset(
    (
        "image_threshold",
        "pixel_threshold",
        "method",
        "quantile",
        "n_images",
        "checkpoint",
        "checkpoint_sha256",
        "backbone",
        "image_size",
        "created",
    )
)


def _describe(path: str | Path | None, digest: str | None) -> str:
    return "no checkpoint" if path is None else f"{path} (sha256 {str(digest)[:12]})"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def save(calibration: Calibration, path: str | Path) -> Path:
    """Same as `calibration.save(path)`."""
    return calibration.save(path)


def make_calibration(
    model: ViP2CLIP,
    checkpoint_path: str | Path | None,
    *,
    image_threshold: float | None,
    pixel_threshold: float | None,
    method: str,
    n_images: int,
    quantile: float | None = None,
    pixel_quantile: float | None = None,
) -> Calibration:
    """A Calibration stamped with `model`'s identity (checkpoint hash, backbone, fingerprint, size) and now.

    `vip2clip test` calls it with method=METHOD_F1 and the F1-optimal thresholds (None where undefined).
    """
    return Calibration(
        image_threshold=_optional_float(image_threshold),
        pixel_threshold=_optional_float(pixel_threshold),
        method=method,
        quantile=quantile,
        n_images=int(n_images),
        checkpoint=None if checkpoint_path is None else str(Path(checkpoint_path).resolve()),
        checkpoint_sha256=None if checkpoint_path is None else file_sha256(checkpoint_path),
        backbone=model.config.backbone,
        image_size=int(model.config.image_size),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pixel_quantile=pixel_quantile,
        backbone_fingerprint=model.backbone.fingerprint(),
        top_k=model.config.top_k,
        sigma=model.config.sigma,
    )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


class StreamingQuantile:
    """Exact high quantile of a stream of values in O((1 - q) * max_count) memory.

    Only the largest values can be the q-quantile, so with the total count bounded by `max_count` in advance
    (e.g. number of images x pixels per map) it suffices to keep the top `keep` values seen so far. The result
    equals `np.quantile(all_values, q)` (linear interpolation) up to float rounding.
    """

    def __init__(self, q: float, max_count: int) -> None:
        if not 0.0 < q <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {q}")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.q = q
        self.max_count = max_count
        # Linear interpolation reads ascending positions floor(q(N-1)) and the next: the top N - floor(q(N-1))
        # values, a count that never decreases with N, so the bound for max_count covers every N <= max_count.
        self.keep = max_count - math.floor(q * (max_count - 1)) + 1
        self.count = 0
        self._top = np.empty(0, dtype=np.float64)

    def add(self, values: np.ndarray) -> None:
        """Add any array of values (flattened)."""
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(flat).all():
            raise ValueError("scores contain NaN or infinite values; cannot calibrate")
        self.count += flat.size
        if self.count > self.max_count:
            raise ValueError(f"more values ({self.count}) than the announced max_count {self.max_count}")
        merged = np.concatenate([self._top, flat])
        if merged.size > self.keep:
            merged = np.partition(merged, merged.size - self.keep)[merged.size - self.keep :]
        self._top = merged

    def value(self) -> float:
        """The q-quantile of everything added so far."""
        if self.count == 0:
            raise ValueError("no pixel scores to calibrate on")
        top = np.sort(self._top)
        offset = self.count - top.size  # ascending index i of the full stream is top[i - offset]
        position = self.q * (self.count - 1)
        low = math.floor(position)
        high = min(low + 1, self.count - 1)
        a, b = top[low - offset], top[high - offset]
        return float(a + (b - a) * (position - low))


def normal_quantile_thresholds(
    image_scores: Sequence[float] | np.ndarray,
    pixel_scores: Sequence[np.ndarray] | np.ndarray | StreamingQuantile,
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
) -> tuple[float, float]:
    """(image threshold, pixel threshold) from normal images only (pure function).

    image_scores: [N] image scores of N normal images.
    pixel_scores: their anomaly maps (a sequence of arrays of any shapes, or one array, e.g. [N, H, W]);
        all values are pooled. Or a `StreamingQuantile` already fed with the maps (bounded memory); its own
        quantile is then used and `pixel_quantile` is ignored.
    The thresholds are the linear-interpolation quantiles (numpy's default) of the two pools.
    """
    for name, q in (("image_quantile", image_quantile), ("pixel_quantile", pixel_quantile)):
        if not 0.0 < q <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {q}")
    scores = np.asarray(image_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("no normal images to calibrate on")
    if not np.isfinite(scores).all():
        raise ValueError("image scores contain NaN or infinite values; cannot calibrate")
    if isinstance(pixel_scores, StreamingQuantile):
        return float(np.quantile(scores, image_quantile)), pixel_scores.value()
    maps = [pixel_scores] if isinstance(pixel_scores, np.ndarray) else list(pixel_scores)
    stream = StreamingQuantile(pixel_quantile, max(1, sum(int(np.size(m)) for m in maps)))
    for anomaly_map in maps:
        stream.add(anomaly_map)
    return float(np.quantile(scores, image_quantile)), stream.value()


def calibrate_from_normal(
    image_scores: Sequence[float] | np.ndarray,
    pixel_scores: Sequence[np.ndarray] | np.ndarray | StreamingQuantile,
    model: ViP2CLIP,
    checkpoint_path: str | Path | None,
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
) -> Calibration:
    """Thresholds from defect-free images: high quantiles of their image scores and of their pixel scores.

    See `normal_quantile_thresholds` for the rule. Warns (UserWarning) below MIN_NORMAL_IMAGES images.
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
        image_scores, pixel_scores, image_quantile, pixel_quantile
    )
    return make_calibration(
        model,
        checkpoint_path,
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        method=METHOD_NORMAL,
        n_images=n_images,
        quantile=image_quantile,
        pixel_quantile=pixel_quantile,
    )
