"""The normal images an INT8 export is calibrated on (`onnx_quantize`): read, preprocessed, and counted honestly.

Unreadable files are skipped and listed. Copies are left out: an image whose decoded pixels equal an earlier one's
(`data.images.pixel_digest`, the digest the reference images and the zero-shot check use) adds nothing to the
activation ranges, so ten copies of one picture count as one calibration image, and the minimum
(MIN_CALIBRATION_IMAGES) is of distinct images. Re-encoded near-duplicates (PNG -> JPEG) have other pixels and
count as images of their own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vip2clip.data.files import find_images, no_images_error
from vip2clip.data.images import BadImageError, load_image, pixel_digest
from vip2clip.data.transforms import preprocess_array

logger = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 8
RECOMMENDED_CALIBRATION_IMAGES = 32


@dataclasses.dataclass
class CalibrationImages:
    """Preprocessed distinct normal images [1, 3, S, S] for calibration; what was skipped and why (unreadable
    files, and copies of an earlier image: "same pixels as PATH")."""

    arrays: list[np.ndarray]
    source: str
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def copies(self) -> int:
        return sum(1 for _, reason in self.skipped if reason.startswith("same pixels as "))

    def shortfall(self) -> str:
        """What the images lack below MIN_CALIBRATION_IMAGES, for the error."""
        unreadable = len(self.skipped) - self.copies
        left_out = [f"{unreadable} unreadable skipped"] if unreadable else []
        left_out += [f"{self.copies} copies of other images left out"] if self.copies else []
        distinct = " distinct" if self.copies else ""
        return f"{self.source} has {len(self.arrays)}{distinct}" + (f" ({', '.join(left_out)})" if left_out else "")


def load_calibration_images(
    paths: Sequence[str | Path], image_size: int, *, progress: Callable[[int, int], None] | None = None
) -> CalibrationImages:
    """The distinct images of `paths` (files or folders), preprocessed to `image_size`; unreadable ones and copies
    are skipped and counted. ValueError when fewer than MIN_CALIBRATION_IMAGES distinct images remain."""
    found = find_images(paths)
    if not found:
        raise no_images_error(paths)
    result = CalibrationImages([], ", ".join(map(str, paths)))
    first_of: dict[str, str] = {}  # pixel digest -> the first file with these pixels
    for index, image in enumerate(found, start=1):
        try:
            decoded = load_image(image.path)
            digest = pixel_digest(decoded)
            if digest in first_of:
                result.skipped.append((str(image.path), f"same pixels as {first_of[digest]}"))
            else:
                first_of[digest] = str(image.path)
                result.arrays.append(preprocess_array(decoded, image_size)[None])
        except BadImageError as error:
            result.skipped.append((str(image.path), error.problem))
            logger.warning("calibration: skipping %s", error)
        if progress is not None:
            progress(index, len(found))
    if result.copies:
        logger.warning(
            "calibration: %d of %d images are copies of others (same pixels): calibrating on %d distinct images",
            result.copies,
            len(found),
            len(result.arrays),
        )
    if len(result.arrays) < MIN_CALIBRATION_IMAGES:
        raise ValueError(
            f"INT8 calibration needs at least {MIN_CALIBRATION_IMAGES} readable normal images (distinct: copies "
            f"count once; better {RECOMMENDED_CALIBRATION_IMAGES} or more); {result.shortfall()}"
        )
    if len(result.arrays) < RECOMMENDED_CALIBRATION_IMAGES:
        logger.warning(
            "calibrating INT8 on %d images; %d or more give steadier ranges",
            len(result.arrays),
            RECOMMENDED_CALIBRATION_IMAGES,
        )
    return result
