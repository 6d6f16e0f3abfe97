"""Finding input images in folders: masks skipped and counted, folder links followed once, unreadable folders
listed (never skipped silently)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from native_trees import write_image

from vip2clip.data import files
from vip2clip.data.files import scan_images


def _keys(paths, **kwargs) -> list[str]:
    return [image.key for image in scan_images(paths, **kwargs).images]


def test_mask_folders_and_mask_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "widget"  # the `vip2clip convert folder` layout
    for name in ("good/a.png", "scratch/b.png", "ground_truth/scratch/b_mask.png", "ground_truth/scratch/c.png",
                 "dent/d.png", "dent/d_MASK.PNG"):  # fmt: skip
        write_image(root / name)
    scan = scan_images([root])
    assert [image.key for image in scan.images] == ["widget/dent/d.png", "widget/good/a.png", "widget/scratch/b.png"]
    assert scan.masks_skipped == 3
    assert "skipped 3 mask file(s)" in scan.notes()[0]
    assert _keys([root / "dent/d_MASK.PNG"]) == ["d_MASK.PNG"]  # named explicitly: taken


def test_folder_links_are_followed_once_and_loops_reported(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "parts", tmp_path / "elsewhere"
    write_image(root / "a.png")
    write_image(elsewhere / "b.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # followed
    (root / "loop").symlink_to(root, target_is_directory=True)  # back to the folder being searched
    (root / "twice").symlink_to(elsewhere, target_is_directory=True)  # a folder already searched
    scan = scan_images([root])
    assert [image.key for image in scan.images] == ["parts/a.png", "parts/linked/b.png"]
    assert dict(scan.links_not_followed) == {
        str(root / "loop"): f"it loops back to {root}",
        str(root / "twice"): f"the same folder as {root / 'linked'}, already searched",
    }
    assert any(note.startswith(f"not following {root / 'loop'}") for note in scan.notes())


def test_unreadable_folders_are_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "parts"
    write_image(root / "a.png")
    locked = root / "locked"
    write_image(locked / "b.png")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the folder unreadable the way a user meets it
        scandir = os.scandir

        def refusing(path):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return scandir(path)

        monkeypatch.setattr(files.os, "scandir", refusing)
    try:
        scan = scan_images([root])
    finally:
        locked.chmod(0o755)
    assert [image.key for image in scan.images] == ["parts/a.png"]
    assert scan.unreadable_folders == [(str(locked), "Permission denied")]
    assert f"cannot list folder {locked}: Permission denied; its images are not included" in scan.notes()
