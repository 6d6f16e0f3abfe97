"""Frozen-feature cache: the backbone's outputs for every training image, computed once, memory-mapped from disk.

The image encoder is frozen, so its outputs for a given image never change during training. The cache stores,
per image, the patch tokens of every tapped layer and the global feature (fp16 by default), plus the
preprocessed mask (bit-packed), so epochs read rows instead of decoding images and running the ViT.

Layout of one cache (a slot folder inside the cache directory, see `vip2clip.features.cache_store`):
    patch_tokens.npy    [N, L, HW, D]   float16 (or float32)
    global_feature.npy  [N, D]          same dtype
    masks.npy           [N, S, ceil(S/8)] uint8, np.packbits of the 0/1 mask along the width
    manifest.json       the key, shapes, grid, the rows that could not be decoded, how the cache was built
                        (world_size, device) and each row's image `pixel_digest` (the checkpoint's record of
                        its training images, `data.zero_shot`); written last
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

This module opens, checks and publishes caches; the key and manifest live in `cache_key`, the build in
`cache_build`, the shared directory's locks and slots in `cache_store`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.images import load_image, pixel_digest
from vip2clip.features import cache_store
from vip2clip.features.cache_build import build_cache
from vip2clip.features.cache_key import ARRAY_FILES, CACHE_FORMAT, CACHE_VERSION, MANIFEST, CacheKey, cache_key
from vip2clip.model.backbone import ImageFeatures
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

logger = logging.getLogger(__name__)


class FeatureCache:
    """Read side of a complete cache: rows by dataset index, as tensors."""

    def __init__(self, directory: Path, manifest: dict[str, Any], *, arrays: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.patch_tokens = arrays["patch_tokens.npy"]  # [N, L, HW, D]
        self.global_feature = arrays["global_feature.npy"]  # [N, D]
        self.packed_masks = arrays["masks.npy"]  # [N, S, ceil(S/8)]
        self.grid = (int(manifest["grid"][0]), int(manifest["grid"][1]))
        self.image_size = int(manifest["key"]["image_size"])
        self.failed: list[tuple[int, str, str]] = [tuple(row) for row in manifest["failed"]]
        self.pixels: list[str] | None = manifest.get("pixels")  # None: built by an older vip2clip

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

    def image_digests(self, dataset: AnomalyDataset, rows: Sequence[int], *, world: World = LOCAL) -> list[str]:
        """The `pixel_digest`s of the images of `rows` (what a checkpoint records, `data.zero_shot`), as the build
        took them while decoding; decoded now (each rank a share) only for a cache of an older vip2clip."""
        if self.pixels is not None:
            return [self.pixels[row] for row in rows]
        share = [rows[i] for i in world.share(len(rows))]
        decoded = world.all_gather([pixel_digest(load_image(dataset.paths(dataset.samples[row])[0])) for row in share])
        return [digest for part in decoded for digest in part]

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
    return FeatureCache(directory, manifest, arrays=arrays)


def _open_shared(directory: Path, key: CacheKey) -> FeatureCache | None:
    with cache_store.slot_lock(directory, key.slot, exclusive=False):
        return open_cache(directory / key.slot, key)


def _warn_old_layout(directory: Path) -> None:
    if (directory / MANIFEST).is_file() and (directory / ARRAY_FILES[0]).is_file():
        old_files = ", ".join([*ARRAY_FILES, MANIFEST])
        logger.warning(
            "%s holds a feature cache of an older vip2clip (arrays directly in the folder); it is no longer used: "
            "delete %s to free the space",
            directory,
            old_files,
        )


def load_or_build_cache(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    *,
    directory: str | Path,
    dtype: str = "float16",
    batch_size: int = 8,
    num_workers: int = 0,
    run: RunContext = LOCAL_RUN,
) -> FeatureCache:
    """Open the cache of `model` and `dataset` in its slot of `directory`, building it first when it is missing or
    stale (see `vip2clip.features.cache_store` for how concurrent processes share a directory). With several
    ranks, every rank calls this; rank 0 decides, locks and publishes, all ranks encode.

    Rows that could not be decoded (with `dataset.skip_bad`) are added to `dataset.skipped` either way.
    """
    directory, world = Path(directory), run.world
    key = cache_key(model, dataset, dtype=dtype, world=world)
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
                build_cache(
                    model, dataset, folder=folder, key=key, batch_size=batch_size, num_workers=num_workers, run=run
                )
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
