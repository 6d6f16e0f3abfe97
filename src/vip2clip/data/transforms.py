"""Between image space and model space: the release's preprocessing in, and anomaly maps back out.

In: images as the model takes them (`resize_image`, `preprocess_array`, `preprocess`: bicubic resize to the model's
square input, RGB, OpenAI mean/std; they live with the model, `vip2clip.model.preprocessing`, and are re-exported
here); masks bilinear-resized and binarised at 0.5.
Out: `resize_map`, the one resizer of anomaly maps (bilinear, half-pixel centres), used by predict, the
heat-map pictures and the server alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vip2clip.model.preprocessing import preprocess, preprocess_array, resize_image  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch

STRIP_PIXELS = 1 << 17  # pixels per strip of full-size work: temporaries of a few MiB whatever the image size


def preprocess_mask(binary_mask: np.ndarray, image_size: int = 518) -> torch.Tensor:
    """Boolean mask [h, w] -> float tensor [S, S] of 0/1.

    Like the release: a 0/255 'L' image resized bilinearly, scaled to [0, 1] and binarised at > 0.5.
    """
    import torch

    as_image = Image.fromarray(np.where(binary_mask, 255, 0).astype(np.uint8), mode="L")
    resized = np.asarray(as_image.resize((image_size, image_size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((resized > 0.5).astype(np.float32))


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False) of a map [h, w] to size = (width, height) -> float32 [height, width].

    numpy only, with torch's `F.interpolate(mode="bilinear")` index and weight arithmetic (float32 scale and
    weights), so it gives torch's numbers to float rounding (about 1e-7) without torch. Computed in row strips
    (`resized_map_strips`), so its memory is the result's (4 bytes per pixel) and a strip's.
    """
    width, height = size
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.shape == (height, width):
        return values
    resized = np.empty((height, width), dtype=np.float32)
    for top, strip in resized_map_strips(values, size):
        resized[top : top + strip.shape[0]] = strip
    return resized


def resized_map_strips(
    anomaly_map: np.ndarray, size: tuple[int, int], *, strip_pixels: int = STRIP_PIXELS
) -> Iterator[tuple[int, np.ndarray]]:
    """`resize_map(anomaly_map, size)` as (first row, float32 [rows, width]) strips of about `strip_pixels`, top
    to bottom, with the same numbers (every value is computed from its own taps): a picture drawn strip by strip
    needs no full-size map. A map already of that size is cut, not copied."""
    width, height = size
    values = np.asarray(anomaly_map, dtype=np.float32)
    rows = max(1, strip_pixels // max(width, 1))
    if values.shape == (height, width):
        for top in range(0, height, rows):
            yield top, values[top : top + rows]
        return
    row_low, row_high, row_weight = _linear_taps(values.shape[0], height)
    column_low, column_high, column_weight = _linear_taps(values.shape[1], width)
    for top in range(0, height, rows):
        weight = row_weight[top : top + rows, None]
        strip = values[row_low[top : top + rows]] * (1 - weight) + values[row_high[top : top + rows]] * weight
        yield top, strip[:, column_low] * (1 - column_weight) + strip[:, column_high] * column_weight


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two input positions and the weight of the second (half-pixel centres).

    As torch computes them: the scale in float32, the source position in double rounded to float32, clamped at 0.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(np.float32)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    weight = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, np.minimum(low + 1, in_size - 1), weight
