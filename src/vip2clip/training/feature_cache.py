"""Frozen-feature cache: the backbone's outputs for every training image, computed once, memory-mapped from disk.

The image encoder is frozen, so its outputs for a given image never change during training. The cache stores,
per image, the patch tokens of every tapped layer and the global feature (fp16 by default), plus the
preprocessed mask (bit-packed), so epochs read rows instead of decoding images and running the ViT.

Layout of a cache directory (one cache per directory):
    patch_tokens.npy    [N, L, HW, D]   float16 (or float32)
    global_feature.npy  [N, D]          same dtype
    masks.npy           [N, S, ceil(S/8)] uint8, np.packbits of the 0/1 mask along the width
    manifest.json       the key, shapes, grid, and the rows that could not be decoded; written last, atomically
Arrays are opened with np.load(mmap_mode="r"), so RAM holds only the rows of the current batch.

The key is the backbone name, `backbone.fingerprint()`, the image size, the feature layers, the encoder precision,
the storage dtype and the SHA-256 of every image and mask file in dataset order (hashing reads each file once: cheap
next to a ViT-L forward). A directory whose manifest is missing (a build that died), whose key differs (stale), or
whose arrays do not have the recorded shapes (truncated) is rebuilt in place. Two processes must not build into
the same directory at the same time.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vip2clip.config import STORAGE_DTYPES
from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.model.backbone import ImageFeatures
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.fileio import atomic_write_text
from vip2clip.utils.hashing import file_sha256
from vip2clip.utils.progress import Progress, silent

logger = logging.getLogger(__name__)

CACHE_FORMAT = "vip2clip-feature-cache"
CACHE_VERSION = 2  # 2: files keyed by SHA-256
MANIFEST = "manifest.json"
ARRAY_FILES = ("patch_tokens.npy", "global_feature.npy", "masks.npy")
DTYPES = {name: np.dtype(name).type for name in STORAGE_DTYPES}


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached values depend on. `files`: "image sha256:mask sha256" (mask part empty) per row."""

    backbone: str
    fingerprint: str
    image_size: int
    feature_layers: tuple[int, ...]
    precision: str
    dtype: str
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["feature_layers"] = list(self.feature_layers)
        data["files"] = list(self.files)
        return data


def cache_key(model: ViP2CLIP, dataset: AnomalyDataset, dtype: str = "float16") -> CacheKey:
    """The key of `model`'s features for every sample of `dataset` (hashes every image and mask file)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    files = []
    for sample in dataset.samples:
        image_path, mask_path = dataset.paths(sample)
        files.append(f"{file_sha256(image_path)}:{file_sha256(mask_path) if mask_path else ''}")
    backbone = model.backbone
    return CacheKey(
        backbone=backbone.name,
        fingerprint=backbone.fingerprint(),
        image_size=dataset.image_size,
        feature_layers=tuple(backbone.feature_layers),
        precision=model.precision,
        dtype=dtype,
        files=tuple(files),
    )


def _manifest_text(key: CacheKey, shapes: dict[str, list[int]], grid: tuple[int, int], failed: list) -> str:
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key.to_dict(),
        "shapes": shapes,
        "grid": list(grid),
        "failed": failed,
    }
    return json.dumps(manifest, indent=1) + "\n"


class FeatureCache:
    """Read side of a complete cache: rows by dataset index, as tensors."""

    def __init__(self, directory: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.patch_tokens = arrays["patch_tokens.npy"]  # [N, L, HW, D]
        self.global_feature = arrays["global_feature.npy"]  # [N, D]
        self.packed_masks = arrays["masks.npy"]  # [N, S, ceil(S/8)]
        self.grid = (int(manifest["grid"][0]), int(manifest["grid"][1]))
        self.image_size = int(manifest["key"]["image_size"])
        self.failed: list[tuple[int, str, str]] = [tuple(row) for row in manifest["failed"]]

    def __len__(self) -> int:
        return int(self.patch_tokens.shape[0])

    @property
    def valid_indices(self) -> list[int]:
        """Rows holding features (rows whose image could not be decoded are left out)."""
        bad = {row[0] for row in self.failed}
        return [i for i in range(len(self)) if i not in bad]

    @property
    def disk_bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in (*ARRAY_FILES, MANIFEST))

    def features(self, indices: Sequence[int], device: torch.device | str = "cpu") -> ImageFeatures:
        """ImageFeatures of rows `indices` as float32: patch tokens L x [B, HW, D], global [B, D]."""
        rows = np.asarray(indices, dtype=np.int64)
        tokens = torch.from_numpy(np.ascontiguousarray(self.patch_tokens[rows])).to(device=device, dtype=torch.float32)
        global_feature = torch.from_numpy(np.ascontiguousarray(self.global_feature[rows]))
        return ImageFeatures(
            tuple(tokens.unbind(dim=1)), global_feature.to(device=device, dtype=torch.float32), self.grid
        )

    def masks(self, indices: Sequence[int]) -> torch.Tensor:
        """Masks [B, S, S] float 0/1 of rows `indices`."""
        packed = self.packed_masks[np.asarray(indices, dtype=np.int64)]
        return torch.from_numpy(np.unpackbits(packed, axis=-1, count=self.image_size).astype(np.float32))


def open_cache(directory: str | Path, key: CacheKey) -> FeatureCache | None:
    """The cache in `directory` if it is complete and has this key; None (with the reason logged) otherwise."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if any((directory / name).exists() for name in ARRAY_FILES):
            logger.info("feature cache %s is incomplete (no manifest): rebuilding", directory)
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("feature cache %s: unreadable manifest (%s): rebuilding", directory, error)
        return None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        logger.info("feature cache %s has another format: rebuilding", directory)
        return None
    if manifest.get("key") != key.to_dict():
        logger.info("feature cache %s is stale (backbone, settings or image files changed): rebuilding", directory)
        return None
    arrays = {}
    for name in ARRAY_FILES:
        try:
            arrays[name] = np.load(directory / name, mmap_mode="r")
        except (OSError, ValueError) as error:
            logger.warning("feature cache %s: %s unreadable (%s): rebuilding", directory, name, error)
            return None
        if list(arrays[name].shape) != manifest["shapes"][name]:
            logger.warning("feature cache %s: %s has the wrong shape: rebuilding", directory, name)
            return None
    return FeatureCache(directory, manifest, arrays)


def _row_shapes(n: int, layers: int, grid: tuple[int, int], dim: int, size: int) -> dict[str, list[int]]:
    return {
        "patch_tokens.npy": [n, layers, grid[0] * grid[1], dim],
        "global_feature.npy": [n, dim],
        "masks.npy": [n, size, (size + 7) // 8],
    }


def _check_free_space(directory: Path, shapes: dict[str, list[int]], itemsize: int) -> int:
    """Bytes the cache will take; raises OSError with a clear message when the disk cannot hold them."""
    needed = int(np.prod(shapes["patch_tokens.npy"]) + np.prod(shapes["global_feature.npy"])) * itemsize
    needed += int(np.prod(shapes["masks.npy"]))
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise OSError(
            f"feature cache {directory} needs {needed / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are free; "
            "use --cache-dir on a larger disk or --no-cache"
        )
    return needed


def _encode_into(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    arrays: dict[str, np.ndarray],
    batch_size: int,
    workers: int,
    progress: Progress,
) -> set[int]:
    """Encode every decodable image of `dataset` into the row arrays; returns the rows written."""
    device = next(model.parameters()).device
    dtype = arrays["patch_tokens.npy"].dtype
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_items, num_workers=workers)
    written: set[int] = set()
    for batch in progress(loader, total=len(loader), desc="caching features"):
        if batch is None:
            continue
        rows = batch["index"].numpy()
        features = model.encode_image(batch["image"].to(device))
        tokens = torch.stack(features.patch_tokens, dim=1)  # [B, L, HW, D]
        arrays["patch_tokens.npy"][rows] = tokens.cpu().numpy().astype(dtype)
        arrays["global_feature.npy"][rows] = features.global_feature.cpu().numpy().astype(dtype)
        arrays["masks.npy"][rows] = np.packbits(batch["mask"].numpy() > 0.5, axis=-1)
        written.update(int(row) for row in rows)
    return written


def _failed_rows(dataset: AnomalyDataset, written: set[int]) -> list[list]:
    """[row, path, reason] of the rows that could not be decoded (reasons known when loaded in this process)."""
    reasons = dict(dataset.skipped)
    failed = []
    for row in sorted(set(range(len(dataset))) - written):
        paths = [path for path in dataset.paths(dataset.samples[row]) if path is not None]
        reason = next((reasons[path] for path in paths if path in reasons), "could not be decoded")
        failed.append([row, paths[0], reason])
    return failed


def build_cache(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    directory: str | Path,
    key: CacheKey,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Progress = silent,
) -> FeatureCache:
    """Run the image encoder once over `dataset` and write the cache (manifest last). Returns it opened."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # from here on the directory reads as incomplete
    backbone, size = model.backbone, dataset.image_size
    grid = (size // backbone.patch_size, size // backbone.patch_size)
    shapes = _row_shapes(len(dataset), len(backbone.feature_layers), grid, backbone.embed_dim, size)
    dtype = DTYPES[key.dtype]
    needed = _check_free_space(directory, shapes, np.dtype(dtype).itemsize)
    logger.info("building feature cache in %s (%.1f MiB for %d images)", directory, needed / 2**20, len(dataset))
    arrays = {
        name: np.lib.format.open_memmap(
            directory / name, mode="w+", dtype=np.uint8 if name == "masks.npy" else dtype, shape=tuple(shape)
        )
        for name, shape in shapes.items()
    }
    written = _encode_into(model, dataset, arrays, batch_size, num_workers, progress)
    for array in arrays.values():
        array.flush()
    del arrays
    atomic_write_text(directory / MANIFEST, _manifest_text(key, shapes, grid, _failed_rows(dataset, written)))
    cache = open_cache(directory, key)
    if cache is None:  # only if the files changed under us while building
        raise OSError(f"feature cache {directory} could not be read back after building it")
    return cache


def load_or_build_cache(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    directory: str | Path,
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Progress = silent,
) -> FeatureCache:
    """Open the cache in `directory` when it matches `model` and `dataset`, otherwise (re)build it.

    Rows that could not be decoded (with `dataset.skip_bad`) are added to `dataset.skipped` either way.
    """
    key = cache_key(model, dataset, dtype)
    cache = open_cache(directory, key)
    if cache is None:
        cache = build_cache(model, dataset, directory, key, batch_size, num_workers, progress)
    else:
        logger.info("using feature cache %s", directory)
    known = {path for path, _ in dataset.skipped}
    dataset.skipped.extend((path, reason) for _, path, reason in cache.failed if path not in known)
    logger.info(
        "feature cache %s: %.1f MiB on disk (%.2f MiB per image)",
        directory,
        cache.disk_bytes / 2**20,
        cache.disk_bytes / 2**20 / max(1, len(cache)),
    )
    return cache
