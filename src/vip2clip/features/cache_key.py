"""The frozen-feature cache's key and manifest (`vip2clip.features.feature_cache`): what a cache was built from
(backbone, its fingerprint, image size, layers, precision, storage dtype, and the SHA-256 of every image and mask
file in dataset order) and the slot its settings name."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vip2clip.config import STORAGE_DTYPES
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.hashing import file_sha256, json_digest

CACHE_FORMAT = "vip2clip-feature-cache"
CACHE_VERSION = 3  # 2: files keyed by SHA-256; 3: one slot folder per settings, published by rename
MANIFEST = "manifest.json"
ARRAY_FILES = ("patch_tokens.npy", "global_feature.npy", "masks.npy")
DTYPES = {name: np.dtype(name).type for name in STORAGE_DTYPES}


@dataclass(frozen=True, kw_only=True)
class CacheKey:
    """Everything the cached values depend on. `files`: "image sha256:mask sha256" (mask part empty) per row;
    `paths`: the rows' image (and mask) paths, which name the slot together with the settings."""

    backbone: str
    fingerprint: str
    image_size: int
    feature_layers: tuple[int, ...]
    precision: str
    dtype: str
    files: tuple[str, ...]
    paths: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature_layers"] = list(self.feature_layers)
        data["files"] = list(self.files)
        del data["paths"]
        return data

    @property
    def slot(self) -> str:
        """Folder name of this cache in a cache directory: readable settings plus a hash of the settings and the
        dataset's paths (not of the file contents: a changed image rebuilds the slot instead of adding one)."""
        settings = {k: v for k, v in self.to_dict().items() if k != "files"}
        digest = json_digest({"version": CACHE_VERSION, **settings, "paths": list(self.paths)}, 16)
        return f"{re.sub(r'[^A-Za-z0-9.-]+', '_', self.backbone)}-{self.image_size}px-{self.dtype}-{digest}"


def _row_hashes(dataset: AnomalyDataset, rows: range) -> list[str]:
    hashes = []
    for row in rows:
        image_path, mask_path = dataset.paths(dataset.samples[row])
        hashes.append(f"{file_sha256(image_path)}:{file_sha256(mask_path) if mask_path else ''}")
    return hashes


def cache_key(model: ViP2CLIP, dataset: AnomalyDataset, *, dtype: str = "float16", world: World = LOCAL) -> CacheKey:
    """The key of `model`'s features for every sample of `dataset` (hashes every image and mask file; with
    several ranks each hashes a share)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    shares = world.all_gather(_row_hashes(dataset, world.share(len(dataset))))
    paths = [":".join(p or "" for p in dataset.paths(sample)) for sample in dataset.samples]
    backbone = model.backbone
    return CacheKey(
        backbone=backbone.name,
        fingerprint=backbone.fingerprint(),
        image_size=dataset.image_size,
        feature_layers=tuple(backbone.feature_layers),
        precision=model.precision,
        dtype=dtype,
        files=tuple(row for share in shares for row in share),
        paths=tuple(paths),
    )


def manifest_text(
    key: CacheKey,
    *,
    shapes: dict[str, list[int]],
    grid: tuple[int, int],
    failed: list,
    built_with: dict[str, Any],
    pixels: list[str],
) -> str:
    """The manifest; `pixels`: each row's image `pixel_digest` ("" for a row that could not be decoded)."""
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key.to_dict(),
        "shapes": shapes,
        "grid": list(grid),
        "failed": failed,
        "built_with": built_with,
        "pixels": pixels,
    }
    return json.dumps(manifest, indent=1) + "\n"
