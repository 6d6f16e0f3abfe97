"""Tiling: images much larger than the model's input, scored tile by tile and stitched back at their own size.

A 20-pixel scratch on a 2448x2048 image shrinks to 4 pixels at 518 px and vanishes in the 14-pixel patch grid.
With a `TileConfig(size, overlap)` the original image is cut into tiles of `size` x `size` pixels (of the
original image), each tile goes through the model at the model's input size, and the tile maps are stitched into
one map of the original size.

Grid: per axis, the fewest tiles whose neighbours overlap by at least `overlap` x `size`, spread evenly, the first
starting at 0 and the last ending at the border. Every tile is `size` long unless the image is shorter (then one
tile spans that axis). `overlap=0` on a side that is a multiple of `size` gives the plain grid.

Stitching: each tile map is resized to its tile (`resize_map`) and added with a weight w(y) w(x) that is 1 inside
the tile and falls linearly towards 0 across the narrowest overlap at its edges; the sum is divided by the summed
weights. So maps cross-fade without seams, a constant model gives exactly that constant, and a pixel covered by one
tile only gets that tile's value. The weights are separable and the grid is a product of two axes, so the summed
weights are the outer product of two per-axis sums: besides one tile's map, memory is a single float32 [H, W]
accumulator (4 bytes per pixel; 80 MB at 20 MP), which becomes the map.

Limits: a tile is at least MIN_TILE_SIZE pixels and an image is cut into at most MAX_TILES tiles (BadImageError
naming the image otherwise, checked from the two axes before any tile list is built). Each tile is one model call
and is enlarged to the model's input (518 px for ViT-L/14): `--tile 1` asked 16,384 calls of a 128-px image and
20 million of a 20 MP one (the tile list alone gigabytes), and below 32 px the enlargement (over 16x) adds model
calls, not detail. 4,096 tiles are about 8 hours per image for ViT-L/14 on a CPU.

Image score: the maximum of the tile scores (the model's own score of each tile; see docs/tiling.md for the rule
measured against the UTPA-style top-K mean of the stitched map).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vip2clip.data.images import BadImageError
from vip2clip.data.transforms import resize_map

DEFAULT_OVERLAP = 0.25
MAX_OVERLAP = 0.9  # beyond it the tile count explodes (1 / (1 - overlap)^2 tiles per tile area)
MIN_TILE_SIZE = 32  # pixels; the reasons for both limits are in the module docstring
MAX_TILES = 4096  # per image

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, PIL's crop order


@dataclass(frozen=True)
class TileConfig:
    """size: tile side in pixels of the original image; overlap: fraction of `size` shared by neighbours."""

    size: int
    overlap: float = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.size < MIN_TILE_SIZE:
            raise ValueError(
                f"tile size must be >= {MIN_TILE_SIZE} pixels, got {self.size} (each tile is one model call and is "
                f"enlarged to the model's input: smaller tiles add calls, not detail)"
            )
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise ValueError(f"tile overlap must be in [0, {MAX_OVERLAP}], got {self.overlap}")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "overlap": self.overlap}


def axis_starts(length: int, *, size: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along an axis of `length` pixels (see the module docstring)."""
    if length <= size:
        return [0]
    stride = size * (1.0 - overlap)
    count = math.ceil((length - size) / stride - 1e-9) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def _ramp(length: int, width: int) -> np.ndarray:
    """[length] float32 weights: 1 inside, falling linearly to 0.5 / width at both ends (all ones if width 0)."""
    if width <= 0:
        return np.ones(length, dtype=np.float32)
    centres = np.arange(length) + 0.5
    return np.minimum(1.0, np.minimum(centres, length - centres) / width).astype(np.float32)


@dataclass(frozen=True)
class _Axis:
    weights: np.ndarray  # [tile length] the weight of a tile's pixels (every tile on an axis has one length)
    total: np.ndarray  # [image length] the summed weights of all tiles on this axis


def _axis(image_length: int, config: TileConfig) -> _Axis:
    starts = axis_starts(image_length, size=config.size, overlap=config.overlap)
    length = min(config.size, image_length)
    # Ramp across the narrowest overlap, so that it fits inside every overlap.
    narrowest = min((a + length - b for a, b in itertools.pairwise(starts)), default=0)
    weights = _ramp(length, narrowest)
    total = np.zeros(image_length, dtype=np.float32)
    for start in starts:
        total[start : start + length] += weights
    return _Axis(weights, total)


def tile_boxes(size: tuple[int, int], config: TileConfig, *, name: str | Path | None = None) -> list[Box]:
    """The tiles of an image of `size` = (width, height), row by row. BadImageError naming `name` (the image) when
    it would need more than MAX_TILES tiles."""
    width, height = size
    lefts = axis_starts(width, size=config.size, overlap=config.overlap)
    tops = axis_starts(height, size=config.size, overlap=config.overlap)
    if len(lefts) * len(tops) > MAX_TILES:
        raise BadImageError(
            name or "image",
            f"{width}x{height} pixels would need {len(lefts) * len(tops):,} tiles of {config.size} px (overlap "
            f"{config.overlap:g}); the limit is {MAX_TILES:,} tiles (model calls) per image: use a larger --tile",
        )
    tile_width, tile_height = min(config.size, width), min(config.size, height)
    return [(left, top, left + tile_width, top + tile_height) for top in tops for left in lefts]


class StitchedMap:
    """The tiles of one image of `size` = (width, height), and the accumulator their maps are blended into.

    `boxes` lists the tiles row by row; `add(i, tile_map, score=)` blends tile i's map (any size, e.g. the model's
    [S, S]); `finish()` returns (image score, map float32 [height, width]) once every tile was added.
    """

    def __init__(self, size: tuple[int, int], config: TileConfig, *, name: str | Path | None = None) -> None:
        width, height = size
        self.boxes = tile_boxes(size, config, name=name)  # first: it refuses too many tiles
        self._x, self._y = _axis(width, config), _axis(height, config)
        self._sum = np.zeros((height, width), dtype=np.float32)
        self._scores = np.zeros(len(self.boxes))
        self._added = np.zeros(len(self.boxes), dtype=bool)

    def add(self, index: int, tile_map: np.ndarray, *, score: float) -> None:
        left, top, right, bottom = self.boxes[index]
        weighted = resize_map(tile_map, (right - left, bottom - top)) * self._y.weights[:, None]
        weighted *= self._x.weights
        self._sum[top:bottom, left:right] += weighted
        self._scores[index] = score
        self._added[index] = True

    def finish(self) -> tuple[float, np.ndarray]:
        """(max tile score, stitched map [H, W]); the accumulator is normalised in place and handed over."""
        if not self._added.all():
            raise ValueError(f"{int((~self._added).sum())} of {len(self.boxes)} tiles were not scored")
        stitched = self._sum
        stitched /= self._y.total[:, None]
        stitched /= self._x.total
        return float(self._scores.max()), stitched
