"""The one image reader: files, uploaded bytes, PIL images and arrays become 8-bit RGB by one set of rules.

Every part of the package that reads an image (datasets, the feature cache, `predict`, `calibrate`, `serve`,
evaluation panels) goes through this module, so a file scores the same wherever it is read.

Decoding (`open_image`): the whole file is decoded at once, so truncated files fail here and not later; every
decoder failure becomes a `BadImageError` naming the file (or "upload") and the problem. `max_pixels` refuses
larger images from their header, before their pixels are decoded (the server's memory bound).

EXIF orientation is applied, as every photo viewer does, so that maps and masks line up with the picture the
user sees. Image *sizes* read from headers (`image_size`) are the displayed sizes too.

Conversion to RGB (`to_rgb`):
- grey, palette, CMYK, YCbCr, LAB, HSV: PIL's conversion;
- RGBA / LA / PA: alpha is dropped, not composited, as `Image.convert("RGB")` in the authors' release does;
- 16-bit (`I;16*`) and 32-bit integer (`I`) images: scaled by 255/65535; data above 65535 is stretched to its
  own maximum instead of being clipped;
- float (`F`) images: values in [0, 1] are scaled by 255, anything larger is read as 16-bit data (and stretched
  above 65535 like `I` data); an image of equal values follows the same rule (0.5 everywhere is grey 128);
- refused (BadImageError naming the file, fail closed): `I`/`F` images with NaN or infinite pixels, which have no
  grey level and would otherwise turn the image black and "normal", and with negative pixels, which no scale to
  8 bits covers without inventing an offset;
- arrays: [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of uint8, bool, or finite float in [0, 1] (alpha dropped);
  other integer types must hold values in 0..255; anything else is a ValueError.

Images of several frames (animated GIF, PNG or WebP, multi-page TIFF) are refused with their frame count: judging
the first frame only would say nothing about the others, silently. MPO files (phone JPEGs) are not: their first
frame is the photo, the others are previews or depth data.

Masks come back as bool [H, W]. The rule that decides "defect" depends on the file, not the dataset name:
- JPEG masks (Kvasir-SEG): compression noise leaves small non-zero values around the edges, so a pixel is a
  defect when its grey level is above half of 255.
- every other format: any non-zero value is a defect. VisA masks hold defect-class indices (1..9), not 255;
  palette masks are judged by their palette colour; RGB masks by any channel.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ImageInput = str | Path | Image.Image | np.ndarray

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
_JPEG_MASK_THRESHOLD = 127  # half of 255
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_BIT_DEPTH_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}  # scaled to 8 bits here, not clipped (module docstring)
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_ONE_PICTURE_FORMATS = _JPEG_FORMATS  # MPO: the first frame is the picture, the others previews or depth data


class BadImageError(ValueError):
    """An image or mask that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self):
        # Rebuild with both arguments when it crosses a process boundary (DataLoader workers).
        return (type(self), (self.path, self.problem))


class TooManyPixelsError(BadImageError):
    """An image refused by `max_pixels` from its header, before its pixels were decoded (the server answers 413)."""


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation still to apply (1 = none), read without decoding the pixels.

    Only an EXIF block counts: PIL turns TIFF images upright itself (its size is already the displayed one), and
    asking PIL about an image without the block would decode a PNG's pixels just to find none.
    """
    if "exif" not in image.info:
        return 1
    return int(image.getexif().get(ExifTags.Base.Orientation, 1) or 1)


def open_image(source: str | Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode a file (path) or an upload (bytes) completely, EXIF orientation applied, in its own mode.

    Raises BadImageError for a missing file, an empty upload, a non-image, a truncated or damaged image, and
    TooManyPixelsError (a BadImageError) for an image of more than `max_pixels` pixels (checked from the header,
    before decoding).
    """
    name = "upload" if isinstance(source, bytes) else source
    if isinstance(source, bytes):
        if not source:
            raise BadImageError(name, "empty (no bytes)")
        stream: str | Path | io.BytesIO = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise BadImageError(path, "no such file" if not path.exists() else "not a file")
        stream = path
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not a reason to refuse a large benchmark image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise TooManyPixelsError(name, f"image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
            image.load()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(name, "not an image (no known format: PNG, JPEG, BMP, TIFF, WebP ...)") from None
    except Image.DecompressionBombError:  # Pillow refuses its own limit (2 x MAX_IMAGE_PIXELS) inside open()
        limit = "" if max_pixels is None else f"; the limit is {max_pixels:,} pixels"
        raise TooManyPixelsError(name, f"image has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels{limit}") from None
    except _DECODE_ERRORS as error:
        raise BadImageError(name, f"damaged or unsupported image ({error})") from None
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format not in _ONE_PICTURE_FORMATS:
        kind = "multi-page" if image.format == "TIFF" else "animated"
        raise BadImageError(
            name,
            f"{kind} {image.format} image with {frames} frames: only single images are judged (judging the first "
            "frame alone would say nothing about the others); save the frames as separate files",
        )
    if _orientation(image) != 1:
        image_format, image = image.format, ImageOps.exif_transpose(image)
        image.format = image_format  # the mask rules look at the file format
    return image


def _high_bit_depth_to_uint8(image: Image.Image, name: str | Path) -> np.ndarray:
    """`I;16*`, `I` and `F` images -> uint8 [H, W], scaled from the 16-bit range (or [0, 1] for floats).

    BadImageError naming `name` for NaN, infinite or negative pixels (rules in the module docstring)."""
    values = np.asarray(image, dtype=np.float64)
    if not values.size:
        return values.astype(np.uint8)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise BadImageError(
            name, f"{bad} of {values.size} pixels are NaN or infinite ({image.mode} image): it cannot be judged"
        )
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise BadImageError(
            name, f"{image.mode} image with negative pixel values (lowest {low:g}): no scale to 8 bits fits them"
        )
    if image.mode == "F" and high <= 1.0:
        scale = 255.0
    elif high > 65535:
        scale = 255.0 / high  # genuinely 32-bit data: stretch to the image's own maximum
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"expected an image array [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"empty image array of shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(
                f"float image arrays must hold values in [0, 1], got {array.min():g}..{array.max():g} "
                "(scale them, or pass uint8)"
            )
        array = np.rint(array * 255)
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer image array of type {array.dtype} must hold values in 0..255")
    array = np.ascontiguousarray(array.astype(np.uint8))
    return Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB")


def to_rgb(image: ImageInput, name: str | Path = "image") -> Image.Image:
    """A path, PIL image (any mode) or array -> 8-bit RGB PIL image by the module's rules (EXIF applied).

    Raises BadImageError for unreadable files and pixels that cannot be judged (named by the path, else `name`),
    ValueError for arrays of another shape or type.
    """
    if isinstance(image, (str, Path)):
        image, name = open_image(image), image
    elif isinstance(image, Image.Image):
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
    elif isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    else:
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(_high_bit_depth_to_uint8(image, name)).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy of an RGB image (memory: 40 MP uploads)


def pixel_digest(image: Image.Image) -> str:
    """Hex SHA-256 of a decoded image's mode, size and pixels: the same picture gives the same digest whatever file
    (or upload) it came from, which is how the reference memory knows an image is one of its own references."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Load an image file as 8-bit RGB (see the module docstring). Raises BadImageError naming the file."""
    return to_rgb(open_image(path, max_pixels), path)


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Uploaded bytes -> 8-bit RGB; BadImageError ("upload: ...") for anything that is not a usable image."""
    return to_rgb(open_image(data, max_pixels), "upload")


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
    image = open_image(path)
    if image.format in _JPEG_FORMATS or (image.format is None and path.suffix.lower() in _JPEG_SUFFIXES):
        return np.asarray(image.convert("L")) > _JPEG_MASK_THRESHOLD
    return _mask_values(image) > 0


def check_mask_size(image_path: str | Path, mask_path: str | Path) -> None:
    """BadImageError naming the mask unless it has its image's size (both read from their headers): a mask of
    another size or aspect would be stretched over the image."""
    size, mask_size = image_size(image_path), image_size(mask_path)
    if mask_size != size:
        problem = f"mask is {mask_size[0]}x{mask_size[1]} but its image {image_path} is {size[0]}x{size[1]}"
        raise BadImageError(mask_path, problem)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as displayed (EXIF orientation applied), read from its header."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "no such file" if not path.exists() else "not a file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            return (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)
    except _DECODE_ERRORS as error:
        raise BadImageError(path, f"cannot read image header ({error})") from None
