"""Between image space and model space: the release's preprocessing in, and anomaly maps back out.

In: bicubic resize to the model's square input, RGB, OpenAI mean/std; masks bilinear-resized and binarised at 0.5.
Out: `resize_map`, the one resizer of anomaly maps (bilinear, half-pixel centres), used by predict, the
heat-map pictures and the server alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vip2clip.config import OPENAI_MEAN, OPENAI_STD

_MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_STD).view(3, 1, 1)


def preprocess(image: Image.Image, image_size: int = 518) -> torch.Tensor:
    """PIL image (any mode) -> normalised float tensor [3, S, S], as the release feeds CLIP."""
    rgb = (image if image.mode == "RGB" else image.convert("RGB")).resize((image_size, image_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - _MEAN) / _STD


def preprocess_mask(binary_mask: np.ndarray, image_size: int = 518) -> torch.Tensor:
    """Boolean mask [h, w] -> float tensor [S, S] of 0/1.

    Like the release: a 0/255 'L' image resized bilinearly, scaled to [0, 1] and binarised at > 0.5.
    """
    as_image = Image.fromarray(np.where(binary_mask, 255, 0).astype(np.uint8), mode="L")
    resized = np.asarray(as_image.resize((image_size, image_size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((resized > 0.5).astype(np.float32))


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False) of a map [h, w] to size = (width, height) -> float32 [height, width]."""
    width, height = size
    if anomaly_map.shape == (height, width):
        return np.asarray(anomaly_map, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
