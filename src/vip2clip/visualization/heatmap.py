"""Heat-map overlays and evaluation panels.

A panel is three tiles side by side: the input image, the anomaly map as a jet-like heat map blended over it,
and the ground-truth mask (white = defect). The map is scaled to [0, 1] with a caller-given range, so that the
panels of one class share a scale and a normal image does not look as "hot" as a defective one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.data.transforms import resize_map
from vip2clip.utils.fileio import atomic_save_image

# Control points of a jet-like colormap: dark blue -> blue -> cyan -> yellow -> red -> dark red.
_JET_POSITIONS = np.array([0.0, 0.11, 0.34, 0.65, 0.89, 1.0])
_JET_COLOURS = np.array(
    [
        [0.0, 0.0, 0.5],
        [0.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.5, 0.0, 0.0],
    ]
)
_GAP = 4  # pixels of white between the tiles of a panel


def normalize_map(anomaly_map: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Scale a map [H, W] to [0, 1] by (low, high), default its own min and max; a flat map gives zeros."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    low = float(values.min()) if low is None else float(low)
    high = float(values.max()) if high is None else float(high)
    if not high > low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """Colour a map of values in [0, 1], [H, W], as uint8 RGB [H, W, 3] (blue = low, red = high)."""
    flat = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0).ravel()
    channels = [np.interp(flat, _JET_POSITIONS, _JET_COLOURS[:, c]) for c in range(3)]
    rgb = np.stack(channels, axis=-1).reshape(*np.shape(values), 3)
    return np.rint(rgb * 255).astype(np.uint8)


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or array ([H, W], [H, W, 3] uint8, or float in [0, 1]) -> uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype.kind == "f":
        array = np.rint(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, 3], got shape {array.shape}")
    return array.astype(np.uint8, copy=False)


def heatmap_overlay(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    low: float | None = None,
    high: float | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend the jet-coloured map over the image. image: [H, W, 3] or PIL; anomaly_map: [h, w], resized to the image.

    (low, high): the map values drawn as the coldest and hottest colours (default: the map's own min and max).
    """
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    scaled = resize_map(normalize_map(anomaly_map, low, high), (width, height))
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * jet(scaled).astype(np.float32)
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def mask_image(mask: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    """A binary mask [H, W] as a white-on-black RGB image of `size` (width, height); None gives a black tile."""
    if mask is None:
        return Image.new("RGB", size)
    tile = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), mode="L")
    return tile.resize(size, Image.NEAREST).convert("RGB")


def make_panel(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Image.Image:
    """Input | overlay | ground truth, side by side with white gaps. image [H, W, 3]; map and mask [h, w]."""
    rgb = Image.fromarray(_as_rgb_array(image))
    tiles = [rgb, heatmap_overlay(rgb, anomaly_map, low, high), mask_image(mask, rgb.size)]
    width, height = rgb.size
    panel = Image.new("RGB", (3 * width + 2 * _GAP, height), (255, 255, 255))
    for position, tile in enumerate(tiles):
        panel.paste(tile, (position * (width + _GAP), 0))
    return panel


def save_panel(
    path: str | Path,
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Path:
    """Write `make_panel(...)` to `path` (PNG, atomically)."""
    return atomic_save_image(make_panel(image, anomaly_map, mask, low, high), path)
