"""Where feature caches live on disk, and how several processes share a cache directory safely.

A cache directory (`--cache-dir`, default OUT/feature_cache) holds one folder per *slot*: the model settings
(backbone, weights, image size, layers, precision, storage dtype) and the dataset's files. Runs with other
settings use other slots side by side; a slot whose image contents changed is rebuilt. Layout:

    CACHE_DIR/<slot>/               a complete cache: arrays + manifest.json, never modified once published
    CACHE_DIR/.<slot>.lock          the slot's lock file (flock), kept
    CACHE_DIR/.<slot>.build-XXXX/   a build in progress, private to its builder
    CACHE_DIR/.<slot>.old-XXXX/     a replaced cache, being deleted

Rules that make concurrent runs safe (a reader can never see a half-written or rewritten file, which is what
crashed readers with a bus error when a second run rewrote a memory-mapped array in place):
- A builder holds the slot's exclusive lock while it builds; a second builder of the same slot waits for it and
  then finds the cache ready. Readers take the shared lock only while opening a cache.
- A cache is built in a private folder and published by renaming that folder into place (atomic on one file
  system). A stale cache is first renamed away, then deleted: processes that have its files memory-mapped keep
  reading the old, intact files (deleting a mapped file does not truncate it).
- Leftovers of killed builders are removed by the next builder of the slot, under the lock.
Where `fcntl` is missing (Windows) or the lock file cannot be created (a read-only cache), no lock is taken;
publishing by rename still keeps every cache complete, at the price of possibly duplicated work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vip2clip.utils.fileio import give_default_mode

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def slot_lock(directory: Path, slot: str, *, exclusive: bool) -> Iterator[None]:
    """Hold the slot's lock (exclusive for building, shared for opening) for the duration of the block."""
    path = directory / f".{slot}.lock"
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - closed below, after unlocking
    except OSError as error:
        if exclusive:
            raise
        logger.debug("no lock for %s (%s): opening without it", path, error)
        yield
        return
    with handle:
        if fcntl is None:
            yield
            return
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("feature cache %s: waiting for another process that is building it", directory / slot)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(directory: Path, slot: str) -> None:
    """Delete build and replaced folders of `slot` left by killed processes (call under the exclusive lock; without
    `fcntl` another process may be building, so nothing is deleted)."""
    if fcntl is None:
        return
    for pattern in (f".{slot}.build-*", f".{slot}.old-*"):
        for leftover in directory.glob(pattern):
            logger.info("removing %s, left by an interrupted feature-cache build", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def new_build_folder(directory: Path, slot: str) -> Path:
    """A new folder to build `slot` in (unique name, same file system as the slot), with the permissions of the
    user's umask (mkdtemp's are owner-only), since it becomes the published cache."""
    folder = Path(tempfile.mkdtemp(prefix=f".{slot}.build-", dir=directory))
    give_default_mode(folder)
    return folder


def publish(build: Path, target: Path) -> None:
    """Move the finished folder `build` to `target` atomically, replacing (and then deleting) a stale `target`."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(build, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(build: Path) -> None:
    """Remove a build folder after a failed build."""
    shutil.rmtree(build, ignore_errors=True)
