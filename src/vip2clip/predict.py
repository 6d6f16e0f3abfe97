"""Predicting on images a practitioner has: PIL images, files or arrays, in their original sizes.

`Predictor` holds a model (built once) and the decision thresholds. `predict(inputs)` preprocesses the images
like training (bicubic resize to the model's square input), runs them in batches, and brings each anomaly map
back to the image's own size (bilinear), so masks and overlays line up with the original pixels.

Decisions: an image is "anomalous" when its score >= the image threshold; a pixel is a defect when its map value
>= the pixel threshold. Both scores are probabilities in [0, 1]; without a calibration file or explicit
thresholds both default to 0.5, which is uncalibrated and said so (`Thresholds.source`).

Folder runs (`vip2clip predict`) live in `vip2clip.predict_files`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vip2clip import calibration as calib
from vip2clip.data.images import load_image
from vip2clip.data.transforms import preprocess

if TYPE_CHECKING:
    from vip2clip.model.vip2clip import ViP2CLIP

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel decision thresholds and where they came from (shown to the user)."""

    image: float
    pixel: float
    source: str


def resolve_thresholds(
    model: ViP2CLIP,
    checkpoint: str | Path | None = None,
    calibration: str | Path | calib.Calibration | None = None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> Thresholds:
    """Explicit thresholds win; the rest come from the calibration (checked against the model), else 0.5.

    Raises ValueError when the calibration was made for another checkpoint, backbone, image size or top_k/sigma,
    and when it has no threshold of a kind (null: undefined for its data) that is not given explicitly: a
    calibrated file with a gap should not silently fall back to the uncalibrated 0.5.
    """
    sources = []
    if calibration is not None:
        loaded = calibration if isinstance(calibration, calib.Calibration) else calib.load(calibration)
        loaded.check_compatible(model, checkpoint)
        name = calibration if not isinstance(calibration, calib.Calibration) else "calibration"
        sources.append(f"calibration {name} ({loaded.method}, {loaded.n_images} images)")
        image_threshold = _from_calibration(loaded.image_threshold, image_threshold, name, "image", "--threshold")
        pixel_threshold = _from_calibration(loaded.pixel_threshold, pixel_threshold, name, "pixel", "--pixel-threshold")
    if image_threshold is None or pixel_threshold is None:
        sources.append(f"default {DEFAULT_THRESHOLD} (uncalibrated)")
    return Thresholds(
        DEFAULT_THRESHOLD if image_threshold is None else float(image_threshold),
        DEFAULT_THRESHOLD if pixel_threshold is None else float(pixel_threshold),
        " + ".join(sources) or "given explicitly",
    )


def _from_calibration(
    calibrated: float | None, explicit: float | None, name: object, kind: str, flag: str
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


@dataclass
class PredictionResult:
    """One image's outcome. Maps and masks are in the image's original size [H, W].

    score: image anomaly score in [0, 1]; decision: "anomalous" if score >= image_threshold else "normal".
    anomaly_map: float32 [H, W]; mask: bool [H, W], anomaly_map >= pixel_threshold.
    max_pixel_score: anomaly_map.max(); defect_area: mask.mean() (fraction of the image flagged).
    """

    score: float
    decision: str
    anomaly_map: np.ndarray
    mask: np.ndarray
    max_pixel_score: float
    defect_area: float
    image_threshold: float
    pixel_threshold: float

    @property
    def is_anomalous(self) -> bool:
        return self.decision == "anomalous"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original image."""
        return self.anomaly_map.shape[1], self.anomaly_map.shape[0]


def make_result(score: float, anomaly_map: np.ndarray, thresholds: Thresholds) -> PredictionResult:
    """Decisions for one image from its score and its map [H, W] (pure)."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    mask = anomaly_map >= thresholds.pixel
    return PredictionResult(
        score=float(score),
        decision="anomalous" if score >= thresholds.image else "normal",
        anomaly_map=anomaly_map,
        mask=mask,
        max_pixel_score=float(anomaly_map.max()),
        defect_area=float(mask.mean()),
        image_threshold=thresholds.image,
        pixel_threshold=thresholds.pixel,
    )


def to_rgb_image(image: ImageInput) -> Image.Image:
    """A path, PIL image or array -> 8-bit RGB PIL image. Alpha is dropped, grey is repeated.

    Arrays: [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; uint8 (0..255), bool, or float in [0, 1].
    Raises BadImageError for unreadable files and ValueError for arrays of another shape or type.
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_image(image)
    raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """PIL image of any mode -> RGB, with 16-bit and float modes scaled like `load_image` does for files."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _array_to_image(np.asarray(image, dtype=np.float64) / (65535.0 if image.mode != "F" else 1.0))
    return image.convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"expected an image array [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        array = np.rint(np.clip(array, 0.0, 1.0) * 255)
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer image array of type {array.dtype} must hold values in 0..255")
    array = np.ascontiguousarray(array.astype(np.uint8))
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"empty image array of shape {array.shape}")
    return Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")


class Predictor:
    """Loads a model once and predicts on images of any size. Not thread-safe: serialise calls.

    >>> predictor = Predictor.from_checkpoint("checkpoint.pt", calibration="calibration.json")  # doctest: +SKIP
    >>> result = predictor.predict("part.png")[0]  # doctest: +SKIP
    >>> result.score, result.decision, result.mask.shape  # doctest: +SKIP
    """

    def __init__(self, model: ViP2CLIP, thresholds: Thresholds | None = None, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.thresholds = thresholds or Thresholds(DEFAULT_THRESHOLD, DEFAULT_THRESHOLD, "default (uncalibrated)")
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None,
        backbone: str | None = None,
        clip_weights: str | Path | None = None,
        calibration: str | Path | calib.Calibration | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        device: str = "cpu",
        image_size: int | None = None,
        precision: str = "fp32",
        batch_size: int = 8,
        **config: Any,
    ) -> Predictor:
        """Build the model (`vip2clip.create_model`) and resolve the thresholds (`resolve_thresholds`)."""
        from vip2clip.factory import create_model

        model = create_model(backbone, clip_weights, checkpoint, image_size, device, **config)
        model.set_precision(precision)
        thresholds = resolve_thresholds(model, checkpoint, calibration, image_threshold, pixel_threshold)
        return cls(model, thresholds, batch_size)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def with_thresholds(self, thresholds: Thresholds) -> Predictor:
        """The same model with other thresholds (no reload)."""
        return Predictor(self.model, thresholds, self.batch_size)

    def raw_scores(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Scores [N] and anomaly maps [N, S, S] at the model's input size, batched (no decisions)."""
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [preprocess(image, self.image_size) for image in images[start : start + self.batch_size]]
            )
            prediction = self.model.predict(batch)
            scores.append(prediction.pred_score.float().cpu().numpy())
            maps.append(prediction.anomaly_map.float().cpu().numpy())
        if not scores:
            return np.zeros(0, dtype=np.float32), np.zeros((0, self.image_size, self.image_size), dtype=np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    def predict(self, inputs: ImageInput | Iterable[ImageInput]) -> list[PredictionResult]:
        """Predict on one input or a list of inputs (paths, PIL images, arrays); one result per input, in order.

        Raises BadImageError (a ValueError naming the file) for an unreadable path.
        """
        single = isinstance(inputs, (str, Path, Image.Image, np.ndarray))
        images = [to_rgb_image(item) for item in ([inputs] if single else inputs)]
        scores, maps = self.raw_scores(images)
        return [
            make_result(score, resize_map(anomaly_map, image.size), self.thresholds)
            for score, anomaly_map, image in zip(scores, maps, images, strict=True)
        ]


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map [S, S] to size = (width, height) -> float32 [height, width]."""
    width, height = size
    if anomaly_map.shape == (height, width):
        return anomaly_map.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
