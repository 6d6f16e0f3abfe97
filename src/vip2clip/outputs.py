"""What scoring produces: one family of validated dataclasses, one image's (`ImageItem`) and a batch's
(`ImageBatch`), with anomalib's field names and types (its output dataclasses: `pred_score`, `pred_label` a boolean,
`anomaly_map`, `pred_mask`; `gt_label`, `gt_mask` for the ground truth). Files and the server's JSON say the decision
in words ("normal", "anomalous", "error": `ImageItem.verdict`).

- `ImageBatch`: what every inference engine returns (`ViP2CLIP.predict`, the ONNX engine): scores [B] and maps
  [B, H, W], torch tensors or numpy arrays; evaluation's `ClassBatch` adds the ground truth and its bookkeeping.
- `ImageItem`: one image, first as scored (`Predictor.score`: the input, its decoded image, its score and map) and
  then as decided (`Predictor.predict`: its label, its defect pixels and the thresholds that made them).

Each is checked when it is made (shapes agree, labels are known, masks are boolean), so a wrong output fails where
it is made, not in a report three modules later. This module imports neither torch nor the rest of the package:
the ONNX engine and the model both use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

ANOMALOUS, NORMAL, ERROR = "anomalous", "normal", "error"  # the verdict's words in files and JSON


def _shape(values: Any) -> tuple[int, ...]:
    return tuple(values.shape)


def _check_mask(name: str, mask: Any, shape: tuple[int, ...]) -> None:
    if _shape(mask) != shape:
        raise ValueError(f"{name} has shape {_shape(mask)}, the anomaly map {shape}")
    if str(mask.dtype) not in ("bool", "torch.bool"):
        raise ValueError(f"{name} must be boolean, got {mask.dtype}")


@dataclass(eq=False)  # arrays have no single truth value: items compare by identity
class ImageItem:
    """One image's outcome: first as scored (`Predictor.score`), then as decided (`Predictor.predict`).

    Args:
        pred_score: the anomalous probability.
        anomaly_map: float [H, W]: at the model's input size as scored; at the image's own size once decided or
            when tiled.
        pred_label: anomalib's type: True anomalous, False normal (set by the decision); None while not decided and
            for an image that could not be judged (`error` says why). `verdict` gives the word files use.
        pred_mask: bool [H, W], anomaly_map >= pixel_threshold (set by the decision).
        image_threshold, pixel_threshold: the thresholds that made the decision.
        error: why the image could not be judged (unreadable, or NaN/infinite model output), else None. Such an
            item has no map or an unusable one, pred_label None (verdict "error") and no defect pixels: a falsy
            pred_label is "normal" only when `error` is None (`is_judged`).
        source: the input as given (a path, an image, a dataset row).
        image: its decoded RGB image.
        self_reference: it is one of the predictor's reference images (scored against the others only).

    Raises:
        ValueError: a map that is not 2-D, a mask of another shape or not boolean, a pred_label that is not a boolean
            (or None), a pred_label on an item with an error.

    Example:
        >>> import numpy as np
        >>> item = ImageItem(
        ...     pred_score=0.9, anomaly_map=np.full((2, 3), 0.7), pred_label=True, pred_mask=np.ones((2, 3), bool)
        ... )
        >>> item.pred_label, item.verdict, item.size, item.defect_area
        (True, 'anomalous', (3, 2), 1.0)
        >>> ImageItem(pred_score=0.9, anomaly_map=np.zeros((2, 3)), pred_label="anomalous")
        Traceback (most recent call last):
        ValueError: pred_label must be True (anomalous), False (normal) or None, got 'anomalous' (the word is `verdict`)
    """

    pred_score: float = math.nan
    anomaly_map: np.ndarray | None = field(default=None, repr=False)  # a printed item shows its numbers, not pixels
    _: KW_ONLY  # the decision and the rest are named
    pred_label: bool | None = None
    pred_mask: np.ndarray | None = field(default=None, repr=False)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    error: str | None = None
    source: Any = None
    image: Image.Image | None = field(default=None, repr=False)
    self_reference: bool = False

    def __post_init__(self) -> None:
        if self.anomaly_map is not None and np.ndim(self.anomaly_map) != 2:
            raise ValueError(f"anomaly_map must be [H, W], got shape {_shape(self.anomaly_map)}")
        if self.pred_mask is not None:
            if self.anomaly_map is None:
                raise ValueError("pred_mask without an anomaly_map")
            _check_mask("pred_mask", self.pred_mask, _shape(self.anomaly_map))
        if isinstance(self.pred_label, np.bool_):  # a numpy comparison's result: the same decision
            self.pred_label = bool(self.pred_label)
        if self.pred_label is not None and not isinstance(self.pred_label, bool):  # 1 or "anomalous": refused
            raise ValueError(
                f"pred_label must be True (anomalous), False (normal) or None, got {self.pred_label!r} "
                "(the word is `verdict`)"
            )
        if self.error is not None and self.pred_label is not None:
            raise ValueError(f"an image that could not be judged has no pred_label (error: {self.error})")

    @property
    def verdict(self) -> str | None:
        """The decision as files and the server's JSON write it: "anomalous", "normal", or "error" for an image that
        could not be judged; None while not decided."""
        if self.error is not None:
            return ERROR
        if self.pred_label is None:
            return None
        return ANOMALOUS if self.pred_label else NORMAL

    @property
    def is_anomalous(self) -> bool:
        """True when decided anomalous (`bool(pred_label)`: an image not judged or not decided is not)."""
        return self.pred_label is True

    @property
    def is_judged(self) -> bool:
        """False when the image could not be read or the model's output could not be trusted."""
        return self.error is None

    @property
    def max_pixel_score(self) -> float:
        """The map's highest value (NaN for an image not judged)."""
        return float(self.anomaly_map.max()) if self.is_judged and self.anomaly_map is not None else math.nan

    @property
    def defect_area(self) -> float:
        """The fraction of the image flagged as defect pixels (NaN for an image not judged or not decided)."""
        return float(self.pred_mask.mean()) if self.is_judged and self.pred_mask is not None else math.nan

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the anomaly map: the original image's once decided."""
        height, width = _shape(self.anomaly_map)
        return width, height


@dataclass(eq=False)
class ImageBatch:
    """A batch's outcome: what every inference engine returns (torch tensors from the torch model, and from the
    ONNX engine when given a tensor; numpy arrays from the ONNX engine given numpy arrays and in evaluation).
    Iterating gives one `ImageItem` per image (numpy, float32).

    Args:
        pred_score: [B] anomalous probabilities.
        anomaly_map: [B, H, W] layer-averaged, Gaussian-smoothed maps (None where a caller keeps no maps).
        pred_mask: [B, H, W] bool, when decided.
        gt_label: [B] ground-truth labels (0 normal, 1 anomalous), when known.
        gt_mask: [B, H, W] bool ground-truth masks, when known.
        features: the frozen encoder's outputs (patch tokens, for reference images and mutual scoring), only
            when asked for (torch model).

    Raises:
        ValueError: a score that is not 1-D, or a map, label or mask whose length or shape disagrees with it.

    Example:
        >>> import numpy as np
        >>> batch = ImageBatch(np.array([0.1, 0.8]), np.zeros((2, 4, 4)))
        >>> len(batch), [round(item.pred_score, 2) for item in batch], batch.numpy()[1].dtype
        (2, [0.1, 0.8], dtype('float32'))
        >>> ImageBatch(np.array([0.1, 0.8]), np.zeros((3, 4, 4)))
        Traceback (most recent call last):
        ValueError: anomaly_map must be [2, H, W], got shape (3, 4, 4)
    """

    pred_score: torch.Tensor | np.ndarray
    anomaly_map: torch.Tensor | np.ndarray | None = None
    _: KW_ONLY  # masks, truth and features are named
    pred_mask: torch.Tensor | np.ndarray | None = None
    gt_label: np.ndarray | None = None
    gt_mask: np.ndarray | None = None
    features: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(_shape(self.pred_score)) != 1:
            raise ValueError(f"pred_score must be [B], got shape {_shape(self.pred_score)}")
        # shape[0], never len(): len() makes an int of a symbolic batch size and would fix it in an ONNX export
        size = self.pred_score.shape[0]
        if self.anomaly_map is not None and (len(_shape(self.anomaly_map)) != 3 or self.anomaly_map.shape[0] != size):
            raise ValueError(f"anomaly_map must be [{size}, H, W], got shape {_shape(self.anomaly_map)}")
        if self.gt_label is not None and _shape(self.gt_label) != (size,):
            raise ValueError(f"gt_label must be [{size}], got shape {_shape(self.gt_label)}")
        for name in ("pred_mask", "gt_mask"):
            mask = getattr(self, name)
            if mask is not None:
                if len(_shape(mask)) != 3 or mask.shape[0] != size:
                    raise ValueError(f"{name} must be [{size}, H, W], got shape {_shape(mask)}")
                if self.anomaly_map is not None:
                    _check_mask(name, mask, _shape(self.anomaly_map))

    def __len__(self) -> int:
        return _shape(self.pred_score)[0]

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(pred_score, anomaly_map) as float32 numpy arrays, from tensors on any device or from arrays."""
        if self.anomaly_map is None:
            raise ValueError("this batch holds no anomaly maps")
        return float32_array(self.pred_score), float32_array(self.anomaly_map)

    def __iter__(self) -> Iterator[ImageItem]:
        scores, maps = self.numpy()
        masks = [None] * len(self) if self.pred_mask is None else as_numpy(self.pred_mask)
        for score, anomaly_map, mask in zip(scores, maps, masks, strict=True):
            yield ImageItem(float(score), anomaly_map, pred_mask=mask)


def as_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """`values` as a numpy array (its own dtype), from a tensor on any device or from an array."""
    return values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)


def float32_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """`values` as a float32 numpy array, from a tensor on any device or from an array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)
