"""The model's input: the release's preprocessing of an image (bicubic resize to the square input side, RGB, OpenAI
mean/std). numpy and PIL only, so that the torch-free engines share it; `ViP2CLIP.preprocess` applies it at the
model's own input size, and `vip2clip.preprocess(image, image_size=...)` at any."""

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
    import torch  # here: the torch-free engines use preprocess_array only

    return torch.from_numpy(preprocess_array(image, image_size))
