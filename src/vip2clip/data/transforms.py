"""Between image space and model space: the release's preprocessing in, and anomaly maps back out.

In: bicubic resize to the model's square input, RGB, OpenAI mean/std; masks bilinear-resized and binarised at 0.5.
Out: `resize_map`, the one resizer of anomaly maps (bilinear, half-pixel centres), used by predict, the
heat-map pictures and the server alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vip2clip.config import OPENAI_MEAN, OPENAI_STD

if TYPE_CHECKING:
    import torch

_MEAN = np.asarray(OPENAI_MEAN, dtype=np.float32)
_STD = np.asarray(OPENAI_STD, dtype=np.float32)


def resize_image(image: Image.Image, image_size: int = 518) -> Image.Image:
    """PIL image (any mode) -> RGB image S x S: the release's resize (PIL bicubic on 8-bit pixels)."""
    return (image if image.mode == "RGB" else image.convert("RGB")).resize((image_size, image_size), Image.BICUBIC)


def preprocess_array(image: Image.Image, image_size: int = 518) -> np.ndarray:
    """PIL image (any mode) -> normalised float32 array [3, S, S], as the release feeds CLIP (numpy only)."""
    pixels = np.asarray(resize_image(image, image_size), dtype=np.float32) / 255.0  # [S, S, 3]
    return np.ascontiguousarray(((pixels - _MEAN) / _STD).transpose(2, 0, 1))


def preprocess(image: Image.Image, image_size: int = 518) -> torch.Tensor:
    """PIL image (any mode) -> normalised float tensor [3, S, S], as the release feeds CLIP."""
    import torch  # here: the torch-free engines use preprocess_array and resize_map only

    return torch.from_numpy(preprocess_array(image, image_size))


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
    weights), so it gives torch's numbers to float rounding (about 1e-7) without torch.
    """
    width, height = size
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.shape == (height, width):
        return values
    low, high, weight = _linear_taps(values.shape[0], height)
    weight = weight[:, None]
    values = values[low] * (1 - weight) + values[high] * weight  # [height, w]
    low, high, weight = _linear_taps(values.shape[1], width)
    return values[:, low] * (1 - weight) + values[:, high] * weight


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two input positions and the weight of the second (half-pixel centres).

    As torch computes them: the scale in float32, the source position in double rounded to float32, clamped at 0.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    source = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(np.float32)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    weight = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, np.minimum(low + 1, in_size - 1), weight
