"""Images too small or too thin for the model to judge: an "error" result naming the reason, never "normal".

The model sees each image (or tile) resized to its square input of S x S pixels, cut into patches of P x P pixels.
The resize cannot represent an image
- with a side shorter than one patch (P of the image's own pixels): the few pixels are stretched across the
  input, so the patches see interpolation, not the part (a 1 x 300 image becomes S copies of one column);
- with a side ratio above the patch grid S / P: squeezed into the square, a square of the image's short side
  covers less than one patch along the long side, so a defect that size falls between the patches.
Torch-free: the ONNX engine's predictor checks images too.
"""

from __future__ import annotations

import re
from typing import Any

from vip2clip.config import TINY_BACKBONE, TINY_PATCH_SIZE
from vip2clip.scoring.tiling import MIN_TILE_SIZE

_VIT_NAME = re.compile(r"^ViT-[^-]+-(\d+)")  # open_clip's names: ViT-L-14-336, ViT-B-16, ... (patch size second)


def patch_size_of(model: Any) -> int | None:
    """The patch size of a model (a `ViP2CLIP`: its backbone's; an exported one: from its backbone's name), or None
    when it cannot be told (an engine of another kind: its images are not checked)."""
    backbone = getattr(model, "backbone", None)
    if hasattr(backbone, "patch_size"):
        return int(backbone.patch_size)
    name = str(getattr(getattr(model, "config", None), "backbone", ""))
    if name == TINY_BACKBONE:
        return TINY_PATCH_SIZE
    match = _VIT_NAME.match(name)
    return int(match.group(1)) if match else None


def unjudgeable_problem(size: tuple[int, int], *, image_size: int, patch: int | None) -> str | None:
    """Why a model input of `size` = (width, height) cannot be judged by a model of input side `image_size` and
    patch size `patch` (see the module docstring), or None when it can (or the patch size is unknown)."""
    if patch is None:
        return None
    width, height = size
    short, long = min(size), max(size)
    if short < patch:
        return (
            f"{width}x{height} pixels: a side shorter than one patch of the model ({patch} pixels) cannot be judged "
            f"(stretched to the model's {image_size}x{image_size} input, its patches would see interpolation)"
        )
    if short * image_size < patch * long:
        tiles = f", or score it with --tile SIZE near its short side ({short})" if short >= MIN_TILE_SIZE else ""
        return (
            f"{width}x{height} pixels: too thin to judge (sides {long / short:.1f}:1, more than the model's patch "
            f"grid {image_size / patch:.1f}:1: squeezed into its {image_size}x{image_size} input, a defect as wide "
            f"as the short side would be narrower than one patch); cut it into squarer pieces{tiles}"
        )
    return None
