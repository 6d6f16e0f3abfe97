"""Loading images and masks from the benchmarks' many file flavours.

Images come back as 8-bit RGB. Alpha is dropped (not composited): that is what `Image.convert("RGB")` in the
authors' release does, so scores match theirs. 16-bit images (`I;16*`, or 32-bit `I` holding 16-bit data)
are scaled by 255/65535 instead of being clipped at 255 as PIL's own conversion would do.

Masks come back as bool [H, W]. The rule that decides "defect" depends on the file, not the dataset name:
- JPEG masks (Kvasir-SEG): compression noise leaves small non-zero values around the edges, so a pixel is a
  defect when its grey level is above half of 255.
- every other format: any non-zero value is a defect. VisA masks hold defect-class indices (1..9), not 255;
  palette masks are judged by their palette colour; RGB masks by any channel.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
_JPEG_MASK_THRESHOLD = 127  # half of 255
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class BadImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self):
        # Rebuild with both arguments when it crosses a process boundary (DataLoader workers).
        return (type(self), (self.path, self.problem))


def _open(path: str | Path) -> Image.Image:
    """Open and fully decode a file, turning every decoder failure into a BadImageError."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file" if not path.exists() else "not a file")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not a reason to refuse a large benchmark image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"cannot read image ({error})") from None
    return image


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """`I;16*`, `I` and `F` images -> uint8 [H, W], scaled from the 16-bit range (or [0, 1] for floats)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and values.size and values.max() <= 1.0:
        scale = 255.0
    elif image.mode == "I" and values.size and values.max() > 65535:
        scale = 255.0 / values.max()  # genuinely 32-bit data: stretch to the image's own maximum
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Load any image file as an 8-bit RGB PIL image (grayscale, palette, RGBA, 16-bit, CMYK ...).

    Raises BadImageError for missing, truncated or undecodable files.
    """
    image = _open(path)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_high_bit_depth_to_uint8(image)).convert("RGB")
    return image.convert("RGB")


def _mask_values(image: Image.Image) -> np.ndarray:
    """Per-pixel magnitude [H, W] of a non-JPEG mask: 0 means background."""
    # A palette index is meaningless without its palette: judge the colour it stands for, like a colour mask.
    if image.mode in ("P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB")).max(axis=2)
    if image.mode in ("LA", "PA"):
        return np.asarray(image.convert("L"))
    return np.asarray(image)


def load_mask(path: str | Path) -> np.ndarray:
    """Load a ground-truth mask as bool [H, W] (rules in the module docstring). Raises BadImageError."""
    path = Path(path)
    image = _open(path)
    if image.format in _JPEG_FORMATS or (image.format is None and path.suffix.lower() in _JPEG_SUFFIXES):
        return np.asarray(image.convert("L")) > _JPEG_MASK_THRESHOLD
    return _mask_values(image) > 0


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file, read from its header without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file" if not path.exists() else "not a file")
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(path, f"cannot read image header ({error})") from None
