"""Frozen-feature cache: the backbone's outputs for every training image, computed once, memory-mapped from disk.

The image encoder is frozen, so its outputs for a given image never change during training. The cache stores,
per image, the patch tokens of every tapped layer and the global feature (fp16 by default), plus the
preprocessed mask (bit-packed), so epochs read rows instead of decoding images and running the ViT.

Layout of one cache (a slot folder inside the cache directory, see `vip2clip.training.cache_store`):
    patch_tokens.npy    [N, L, HW, D]   float16 (or float32)
    global_feature.npy  [N, D]          same dtype
    masks.npy           [N, S, ceil(S/8)] uint8, np.packbits of the 0/1 mask along the width
    manifest.json       the key, shapes, grid, the rows that could not be decoded and how the cache was built
                        (world_size, device); written last
Arrays are opened with np.load(mmap_mode="r"), so RAM holds only the rows of the current batch.

The key is the backbone name, `backbone.fingerprint()`, the image size, the feature layers, the encoder precision,
the storage dtype and the SHA-256 of every image and mask file in dataset order (hashing reads each file once: cheap
next to a ViT-L forward). Everything but the file contents also names the slot, so runs with other settings
sharing one cache directory each get their own slot. A slot whose manifest is missing or unreadable, whose key
differs (the images changed) or whose arrays do not have the recorded shapes (truncated) is rebuilt: in a new
folder that replaces it atomically, so a process still reading the old cache is never disturbed.

With several ranks (`World`), each rank hashes and encodes a disjoint share of the images, in the batches a
one-process build forms, so the arrays are byte-identical to a one-process build; rank 0 writes the manifest
after every rank has finished and publishes the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vip2clip.config import STORAGE_DTYPES
from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.model.backbone import ImageFeatures
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.training import cache_store
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.fileio import atomic_write_text
from vip2clip.utils.hashing import file_sha256, json_digest
from vip2clip.utils.progress import Progress, silent

logger = logging.getLogger(__name__)

CACHE_FORMAT = "vip2clip-feature-cache"
CACHE_VERSION = 3  # 2: files keyed by SHA-256; 3: one slot folder per settings, published by rename
MANIFEST = "manifest.json"
ARRAY_FILES = ("patch_tokens.npy", "global_feature.npy", "masks.npy")
DTYPES = {name: np.dtype(name).type for name in STORAGE_DTYPES}


@dataclass(frozen=True)
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


def cache_key(model: ViP2CLIP, dataset: AnomalyDataset, dtype: str = "float16", world: World = LOCAL) -> CacheKey:
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


def _manifest_text(
    key: CacheKey, shapes: dict[str, list[int]], grid: tuple[int, int], failed: list, built_with: dict[str, Any]
) -> str:
    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key.to_dict(),
        "shapes": shapes,
        "grid": list(grid),
        "failed": failed,
        "built_with": built_with,
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


def _open_arrays(folder: Path, shapes: dict[str, list[int]], dtype: type, mode: str) -> dict[str, np.memmap]:
    """The cache's arrays in `folder`: created zero-filled (mode "w+") or opened for writing rows ("r+")."""
    return {
        name: np.lib.format.open_memmap(
            folder / name, mode=mode, dtype=np.uint8 if name == "masks.npy" else dtype, shape=tuple(shape)
        )
        for name, shape in shapes.items()
    }


def _encode_into(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    arrays: dict[str, np.ndarray],
    rows: range,
    batch_size: int,
    workers: int,
    progress: Progress,
) -> set[int]:
    """Encode the decodable images among `rows` of `dataset` (whole batches of a one-process build, so that every
    image is encoded in the same batch as there) into the row arrays; returns the rows written."""
    device = next(model.parameters()).device
    dtype = arrays["patch_tokens.npy"].dtype
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, collate_fn=collate_items, num_workers=workers)
    written: set[int] = set()
    for batch in progress(loader, total=len(loader), desc="caching features"):
        if batch is None:
            continue
        indices = batch["index"].numpy()
        features = model.encode_image(batch["image"].to(device))
        tokens = torch.stack(features.patch_tokens, dim=1)  # [B, L, HW, D]
        arrays["patch_tokens.npy"][indices] = tokens.cpu().numpy().astype(dtype)
        arrays["global_feature.npy"][indices] = features.global_feature.cpu().numpy().astype(dtype)
        arrays["masks.npy"][indices] = np.packbits(batch["mask"].numpy() > 0.5, axis=-1)
        written.update(int(row) for row in indices)
    return written


def _failed_rows(dataset: AnomalyDataset, written: set[int], reasons: dict[str, str]) -> list[list]:
    """[row, path, reason] of the rows that could not be decoded (reasons known where they were loaded)."""
    failed = []
    for row in sorted(set(range(len(dataset))) - written):
        paths = [path for path in dataset.paths(dataset.samples[row]) if path is not None]
        reason = next((reasons[path] for path in paths if path in reasons), "could not be decoded")
        failed.append([row, paths[0], reason])
    return failed


def build_cache(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    folder: str | Path,
    key: CacheKey,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Progress = silent,
    world: World = LOCAL,
) -> None:
    """Run the image encoder once over `dataset` and write the cache files into `folder` (a private build folder:
    `load_or_build_cache` publishes it). Every rank encodes its share; rank 0 creates the arrays and writes the
    manifest last, after every rank has written its rows."""
    folder = Path(folder)
    backbone, size = model.backbone, dataset.image_size
    grid = (size // backbone.patch_size, size // backbone.patch_size)
    shapes = _row_shapes(len(dataset), len(backbone.feature_layers), grid, backbone.embed_dim, size)
    dtype = DTYPES[key.dtype]
    if world.is_main:
        needed = _check_free_space(folder, shapes, np.dtype(dtype).itemsize)
        logger.info("building feature cache in %s (%.1f MiB for %d images)", folder, needed / 2**20, len(dataset))
        arrays = _open_arrays(folder, shapes, dtype, "w+")
    world.barrier()  # the files exist
    if not world.is_main:
        arrays = _open_arrays(folder, shapes, dtype, "r+")
    rows = world.share(len(dataset), unit=batch_size)
    written = _encode_into(model, dataset, arrays, rows, batch_size, num_workers, progress)
    for array in arrays.values():
        array.flush()
    del arrays
    reports = world.gather((sorted(written), list(dataset.skipped)))  # after every rank has flushed its rows
    if world.is_main:
        written = {row for rows_written, _ in reports for row in rows_written}
        reasons = {path: reason for _, skipped in reports for path, reason in skipped}
        failed = _failed_rows(dataset, written, reasons)
        built_with = world.describe(model)
        atomic_write_text(folder / MANIFEST, _manifest_text(key, shapes, grid, failed, built_with))


def _open_shared(directory: Path, key: CacheKey) -> FeatureCache | None:
    with cache_store.slot_lock(directory, key.slot, exclusive=False):
        return open_cache(directory / key.slot, key)


def _warn_old_layout(directory: Path) -> None:
    if (directory / MANIFEST).is_file() and (directory / ARRAY_FILES[0]).is_file():
        logger.warning(
            "%s holds a feature cache of an older vip2clip (arrays directly in the folder); it is no longer used: "
            "delete %s to free the space", directory, ", ".join([*ARRAY_FILES, MANIFEST])
        )  # fmt: skip


def load_or_build_cache(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    directory: str | Path,
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 0,
    progress: Progress = silent,
    world: World = LOCAL,
) -> FeatureCache:
    """Open the cache of `model` and `dataset` in its slot of `directory`, building it first when it is missing or
    stale (see `vip2clip.training.cache_store` for how concurrent processes share a directory). With several
    ranks, every rank calls this; rank 0 decides, locks and publishes, all ranks encode.

    Rows that could not be decoded (with `dataset.skip_bad`) are added to `dataset.skipped` either way.
    """
    directory = Path(directory)
    key = cache_key(model, dataset, dtype, world)
    slot = directory / key.slot
    cache = None
    with contextlib.ExitStack() as stack:
        folder = None
        if world.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            _warn_old_layout(directory)
            cache = _open_shared(directory, key)
            if cache is None:
                stack.enter_context(cache_store.slot_lock(directory, key.slot, exclusive=True))
                cache = open_cache(slot, key)  # built by another process while this one waited for the lock
            if cache is None:
                cache_store.remove_leftovers(directory, key.slot)
                folder = cache_store.new_build_folder(directory, key.slot)
        folder = world.broadcast(folder)
        if folder is not None:
            try:
                build_cache(model, dataset, folder, key, batch_size, num_workers, progress, world)
                if world.is_main:
                    cache_store.publish(folder, slot)
            except BaseException:
                if world.is_main:
                    cache_store.discard(folder)
                raise
            if world.is_main:
                cache = open_cache(slot, key)
                if cache is None:
                    raise OSError(f"feature cache {slot} could not be read back after building it")
    world.barrier()  # published
    if not world.is_main:
        cache = _open_shared(directory, key)
        if cache is None:
            raise OSError(f"feature cache {slot} was replaced by another run (with other image files) meanwhile")
    known = {path for path, _ in dataset.skipped}
    dataset.skipped.extend((path, reason) for _, path, reason in cache.failed if path not in known)
    logger.info(
        "feature cache %s: %.1f MiB on disk (%.2f MiB per image)",
        slot,
        cache.disk_bytes / 2**20,
        cache.disk_bytes / 2**20 / max(1, len(cache)),
    )
    return cache
