"""Decision thresholds: where a predictor's image and pixel thresholds come from (explicit values, a calibration
file checked against the predictor's identity, else the uncalibrated default 0.5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vip2clip.inference import calibration as calib
from vip2clip.inference.identity import PredictorIdentity

DEFAULT_THRESHOLD = 0.5

# Why mutual scores need thresholds of their own (docs/mutual.md, "Thresholds").
MUTUAL_UNCALIBRATED = (
    "mutual scoring needs calibrated thresholds: its fused scores are (1 - w) x the zero-shot probability + w x a "
    "patch distance whose level depends on the backbone and the part, so the uncalibrated default 0.5 calls most "
    "defects normal. Calibrate on normal images of the part with the same options "
    "(`vip2clip calibrate GOOD_DIR --mutual ... --out calibration.json`) and pass --calibration calibration.json, "
    "or give both --threshold and --pixel-threshold (test --mutual also writes a calibration.json)"
)


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel decision thresholds and where they came from (shown to the user); `uncalibrated`: one of
    them is the default 0.5, which only the zero-shot probabilities are on the scale of (not mutual scores)."""

    image: float
    pixel: float
    source: str
    uncalibrated: bool = False

    def __post_init__(self) -> None:
        calib.check_threshold(self.image, "image threshold")
        calib.check_threshold(self.pixel, "pixel threshold")


def resolve_thresholds(
    identity: PredictorIdentity,
    calibration: str | Path | calib.Calibration | None = None,
    *,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> Thresholds:
    """Explicit thresholds win; the rest come from the calibration (checked against `identity`), else 0.5.

    Raises ValueError when the calibration was made for another checkpoint, backbone, image size or top_k/sigma,
    when it has no threshold of a kind (null: undefined for its data) that is not given explicitly (a calibrated
    file with a gap should not silently fall back to the uncalibrated 0.5), and when `identity` scores mutually
    and a threshold would be the default 0.5 (`MUTUAL_UNCALIBRATED`).
    """
    for value, name in (
        (image_threshold, "image threshold (--threshold)"),
        (pixel_threshold, "pixel threshold (--pixel-threshold)"),
    ):
        if value is not None:
            calib.check_threshold(value, name)
    sources = []
    if calibration is not None:
        loaded = calibration if isinstance(calibration, calib.Calibration) else calib.load(calibration)
        loaded.check_compatible(identity)
        name = calibration if not isinstance(calibration, calib.Calibration) else "calibration"
        sources.append(f"calibration {name} ({loaded.method}, {loaded.n_images} images)")
        image_threshold = _from_calibration(
            loaded.image_threshold, image_threshold, name=name, kind="image", flag="--threshold"
        )
        pixel_threshold = _from_calibration(
            loaded.pixel_threshold, pixel_threshold, name=name, kind="pixel", flag="--pixel-threshold"
        )
    uncalibrated = image_threshold is None or pixel_threshold is None
    if uncalibrated and identity.mutual is not None:
        raise ValueError(MUTUAL_UNCALIBRATED)
    if uncalibrated:
        sources.append(f"default {DEFAULT_THRESHOLD} (uncalibrated)")
    return Thresholds(
        DEFAULT_THRESHOLD if image_threshold is None else float(image_threshold),
        DEFAULT_THRESHOLD if pixel_threshold is None else float(pixel_threshold),
        " + ".join(sources) or "given explicitly",
        uncalibrated,
    )


def _from_calibration(
    calibrated: float | None, explicit: float | None, *, name: object, kind: str, flag: str
) -> float | None:
    """The explicit threshold, else the calibration's; ValueError when both are missing."""
    if explicit is not None:
        return explicit
    if calibrated is None:
        raise ValueError(
            f"calibration {name} has no {kind} threshold (it was undefined for the data it was computed on, e.g. "
            f"{'data with one image label only' if kind == 'image' else 'images without masks'}), but {kind} "
            f"decisions need one: give it explicitly ({flag} on the command line, {kind}_threshold= in Python)"
        )
    return calibrated
