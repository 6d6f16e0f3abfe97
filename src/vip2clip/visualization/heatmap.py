"""Heat-map colours and overlays on ONE fixed colour scale.

The anomaly map is the model's anomalous probability per pixel (a softmax over the normal and anomalous states,
averaged over layers and smoothed), so its whole range is [0, 1] and 0.5 means "as anomalous as normal". Every
picture colours it on that fixed range (`MAP_LOW`, `MAP_HIGH`): 0 is dark blue and 1 dark red in every image of
every run, whether evaluation panels, `predict` overlays or the serve page. A per-image range (min to max) paints
the noise of a defect-free image as red as a real defect; a per-class or per-run range changes with what else is
in the run and cannot be known by `predict` or `serve`, which see one image at a time. The price of the fixed
range: a model whose maps sit in a narrow band (an untrained or random one, near 0.5) shows little contrast,
which is the truth about it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vip2clip.data.transforms import resized_map_strips

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
MAP_LOW, MAP_HIGH = 0.0, 1.0  # the fixed colour scale: map values drawn as the coldest and the hottest colour


def normalize_map(anomaly_map: np.ndarray, *, low: float = MAP_LOW, high: float = MAP_HIGH) -> np.ndarray:
    """Scale a map [H, W] from (low, high) to [0, 1], clipped (default: the fixed scale, an identity clip)."""
    if not high > low:
        raise ValueError(f"the colour scale needs low < high, got ({low}, {high})")
    values = np.asarray(anomaly_map, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """Colour a map of values in [0, 1], [H, W], as uint8 RGB [H, W, 3] (blue = low, red = high)."""
    flat = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0).ravel()
    channels = [np.interp(flat, _JET_POSITIONS, _JET_COLOURS[:, c]) for c in range(3)]
    rgb = np.stack(channels, axis=-1).reshape(*np.shape(values), 3)
    return np.rint(rgb * 255).astype(np.uint8)


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
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
    *,
    low: float = MAP_LOW,
    high: float = MAP_HIGH,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend the jet-coloured map over the image. image: [H, W, 3] or PIL; anomaly_map: [h, w], resized to the image.

    (low, high): the map values drawn as the coldest and hottest colours (default: the fixed scale, see above).
    Drawn in row strips (`resized_map_strips`): beside the picture it returns (PIL keeps 4 bytes per pixel), its
    memory is one strip's, whatever the image size (`predict` writes full-size overlays of 40 MP images).
    """
    source = image if isinstance(image, Image.Image) else Image.fromarray(as_rgb_array(image))
    source = source if source.mode == "RGB" else source.convert("RGB")
    width, height = source.size
    values = np.asarray(anomaly_map, dtype=np.float32)
    full_size = values.shape == (height, width)
    # The colour scale applies before a resize (clipped values are interpolated): to the small map, or per strip
    # of a full-size one (no full-size copy).
    scaled = values if full_size else normalize_map(values, low=low, high=high)
    overlay = Image.new("RGB", (width, height))
    for top, strip in resized_map_strips(scaled, (width, height)):
        rgb = np.asarray(source.crop((0, top, width, top + strip.shape[0])))
        colours = jet(normalize_map(strip, low=low, high=high) if full_size else strip)
        blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours.astype(np.float32)
        overlay.paste(Image.fromarray(np.rint(blended).astype(np.uint8)), (0, top))
    return overlay
