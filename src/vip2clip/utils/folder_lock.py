"""One run at a time in an output folder: an exclusive lock that a second run is refused on, never waits for.

Commands that resume what an earlier run left in their output folder (`study`, `train --resume`, `benchmark`,
`predict`) would otherwise let two runs pick up the same unfinished unit and both work on it. `exclusive_folder` takes
an exclusive `flock` on FOLDER/.vip2clip.lock for the duration of the command and writes the holder's pid into it; a
second run is refused at once with `FolderBusyError` naming the folder and that pid. The lock belongs to the open
file, so the operating system releases it when the process ends in any way (exit, exception, crash, kill -9):
a lock file left by a killed run is not a lock, and the next run takes it over. A run removes the file as it
ends (still holding the lock; a process that opened the file meanwhile finds it replaced and locks the new one,
so removing it cannot let two runs in). Where `fcntl` is missing (Windows) nothing is locked. The feature
cache's slots have their own waiting locks (`features.cache_store`): there a second process has a use for the
result and waits for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

LOCK_NAME = ".vip2clip.lock"


class FolderBusyError(OSError):
    """Another process holds the folder's lock (the message names the folder and its pid)."""


def _locked(path: Path, folder: Path, command: str) -> IO[str]:
    """The lock file at `path`, open and exclusively locked; FolderBusyError naming the holder's pid."""
    while True:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - returned open: the lock lives as long as it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FolderBusyError(
                f"{folder} is in use by another run (pid {holder}): two runs in one output folder would both "
                f"work on the same unfinished parts; wait for it to end, or give this {command} another --out"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        handle.close()  # its holder removed the file as this process opened it: lock the file there now


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, command: str, *, take: bool = True) -> Iterator[None]:
    """Hold FOLDER's lock while the block runs; FolderBusyError when another process holds it. FOLDER is created
    for the lock, and removed again when the block leaves nothing else in it (a refused run leaves no folder).

    command: what runs, for the message ("vip2clip study"); take=False holds nothing (the other ranks of a
    torchrun job, whose rank 0 holds the lock for them)."""
    if not take or fcntl is None:
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = _locked(path, folder, command)
    try:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a process that opened it meanwhile sees it replaced
        handle.close()
        if created:
            with contextlib.suppress(OSError):  # not empty: the run's results
                folder.rmdir()
