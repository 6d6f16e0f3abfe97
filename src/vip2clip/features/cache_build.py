"""Building a frozen-feature cache (`vip2clip.features.feature_cache` opens and publishes it): the image encoder
run once over a dataset, its outputs written into memory-mapped row arrays, the manifest last. With several ranks
each encodes its share in the batches a one-process build forms, so the arrays are byte-identical to one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.features.cache_key import DTYPES, MANIFEST, CacheKey, manifest_text
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.fileio import atomic_write_text
from vip2clip.utils.progress import Progress
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

logger = logging.getLogger(__name__)


def _row_shapes(n: int, *, layers: int, grid: tuple[int, int], dim: int, size: int) -> dict[str, list[int]]:
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
    *,
    arrays: dict[str, np.ndarray],
    rows: range,
    batch_size: int,
    workers: int,
    progress: Progress,
) -> dict[int, str]:
    """Encode the decodable images among `rows` of `dataset` (whole batches of a one-process build, so that every
    image is encoded in the same batch as there) into the row arrays; returns the rows written and their images'
    pixel digests (`data.zero_shot`: what a checkpoint records, taken here where the images are decoded anyway)."""
    device = next(model.parameters()).device
    dtype = arrays["patch_tokens.npy"].dtype
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, collate_fn=collate_items, num_workers=workers)
    written: dict[int, str] = {}
    for batch in progress(loader, total=len(loader), desc="caching features"):
        if batch is None:
            continue
        indices = batch["index"].numpy()
        features = model.encode_image(batch["image"].to(device))
        tokens = torch.stack(features.patch_tokens, dim=1)  # [B, L, HW, D]
        arrays["patch_tokens.npy"][indices] = tokens.cpu().numpy().astype(dtype)
        arrays["global_feature.npy"][indices] = features.global_feature.cpu().numpy().astype(dtype)
        arrays["masks.npy"][indices] = np.packbits(batch["mask"].numpy() > 0.5, axis=-1)
        written.update(zip((int(row) for row in indices), batch["pixels"], strict=True))
    return written


def _failed_rows(dataset: AnomalyDataset, written: dict[int, str], reasons: dict[str, str]) -> list[list]:
    """[row, path, reason] of the rows that could not be decoded (reasons known where they were loaded)."""
    failed = []
    for row in sorted(set(range(len(dataset))) - written.keys()):
        paths = [path for path in dataset.paths(dataset.samples[row]) if path is not None]
        reason = next((reasons[path] for path in paths if path in reasons), "could not be decoded")
        failed.append([row, paths[0], reason])
    return failed


def build_cache(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    *,
    folder: str | Path,
    key: CacheKey,
    batch_size: int = 8,
    num_workers: int = 0,
    run: RunContext = LOCAL_RUN,
) -> None:
    """Run the image encoder once over `dataset` and write the cache files into `folder` (a private build folder:
    `load_or_build_cache` publishes it). Every rank encodes its share; rank 0 creates the arrays and writes the
    manifest last, after every rank has written its rows."""
    world = run.world
    folder = Path(folder)
    backbone, size = model.backbone, dataset.image_size
    grid = (size // backbone.patch_size, size // backbone.patch_size)
    shapes = _row_shapes(
        len(dataset), layers=len(backbone.feature_layers), grid=grid, dim=backbone.embed_dim, size=size
    )
    dtype = DTYPES[key.dtype]
    if world.is_main:
        needed = _check_free_space(folder, shapes, np.dtype(dtype).itemsize)
        logger.info("building feature cache in %s (%.1f MiB for %d images)", folder, needed / 2**20, len(dataset))
        arrays = _open_arrays(folder, shapes, dtype, "w+")
    world.barrier()  # the files exist
    if not world.is_main:
        arrays = _open_arrays(folder, shapes, dtype, "r+")
    rows = world.share(len(dataset), unit=batch_size)
    written = _encode_into(
        model, dataset, arrays=arrays, rows=rows, batch_size=batch_size, workers=num_workers, progress=run.progress
    )
    for array in arrays.values():
        array.flush()
    del arrays
    reports = world.gather((written, list(dataset.skipped)))  # after every rank has flushed its rows
    if world.is_main:
        written = {row: pixels for rows_written, _ in reports for row, pixels in rows_written.items()}
        reasons = {path: reason for _, skipped in reports for path, reason in skipped}
        failed = _failed_rows(dataset, written, reasons)
        built_with = world.describe(model)
        pixels = [written.get(row, "") for row in range(len(dataset))]
        manifest = manifest_text(key, shapes=shapes, grid=grid, failed=failed, built_with=built_with, pixels=pixels)
        atomic_write_text(folder / MANIFEST, manifest)
