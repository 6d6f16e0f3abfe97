"""Atomic writes: the user's umask applies, a failed write (a full disk) leaves the earlier file and no temporary
file, and names the file instead of torch's "[enforce fail ...] unexpected pos"."""

from __future__ import annotations

import os
import resource
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vip2clip.utils.fileio import atomic_save_image, atomic_torch_save, atomic_write_json, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_users_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        written = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            atomic_write_json(tmp_path / "a.json", {"x": float("nan")}),
            atomic_save_image(Image.fromarray(np.zeros((2, 2), np.uint8)), tmp_path / "a.png"),
            atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "a.pt"),
        ]
    finally:
        os.umask(previous)
    for path in written:  # as open(path, "w") would make them: 0o666 minus the umask (mkstemp made them 0o600)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert (tmp_path / "a.json").read_text() == '{\n  "x": null\n}\n'


def test_a_write_that_runs_out_of_space_keeps_the_earlier_file(tmp_path: Path) -> None:
    path = atomic_torch_save({"x": torch.zeros(10)}, tmp_path / "last.pt")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # A file size limit fails writes part-way, like a disk that fills up during the write (Python ignores SIGXFSZ).
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError, match=rf"cannot write {path}: File too large \(the earlier file is unchanged"):
            atomic_torch_save({"x": torch.zeros(1_000_000)}, path)
        with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'big.txt'}: File too large"):
            atomic_write_text(tmp_path / "big.txt", "x" * 200_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert torch.load(path, weights_only=True)["x"].shape == (10,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
