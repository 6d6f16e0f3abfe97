"""`vip2clip validate` on release-style indexes: passes on a good tree, lists every planted problem on a broken one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.validate import validate_path


def _release_style_index(root: Path) -> Path:
    """Our synthetic index rewritten the way other scripts write theirs: absolute paths, "Train"/"Test"."""
    clean = json.loads((root / "meta.json").read_text())
    release = {
        split.capitalize(): {
            cls_name: [
                {
                    **sample,
                    "img_path": f"{root.as_posix()}/{sample['img_path']}",
                    "mask_path": f"{root.as_posix()}//{sample['mask_path']}" if sample["mask_path"] else "",
                    "normal_path": "",
                }
                for sample in samples
            ]
            for cls_name, samples in by_class.items()
        }
        for split, by_class in clean.items()
    }
    (root / "meta.json").write_text(json.dumps(release, indent=4))
    return root / "meta.json"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    generate_benchmark(root, classes=2, seed=0, image_size=32, n_train_good=1, n_test_good=2, n_test_defect=2)
    _release_style_index(root)
    return root


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["validate", *argv])
    return code, capsys.readouterr().out


def test_release_style_index_on_a_good_tree_passes(tree: Path, capsys) -> None:
    code, out = _run(capsys, str(tree))
    assert code == 0, out
    assert out.splitlines()[0] == f"{tree / 'meta.json'}: 10 samples (train 2, test 8)"
    assert out.splitlines()[-1] == "OK, 0 note(s)"
    code, out = _run(capsys, str(tree / "meta.json"), "--quick")
    assert code == 0, out


def test_each_planted_problem_is_listed(tree: Path, capsys) -> None:
    meta = json.loads((tree / "meta.json").read_text())
    samples = meta["Test"]["texture_0"]
    (tree / "texture_0/test/good/000.png").unlink()  # missing image
    (tree / "texture_0/test/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable image
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tree / "texture_0/ground_truth/scratch/000_mask.png")
    (tree / "texture_0/ground_truth/blob/000_mask.png").unlink()  # missing mask
    samples.append(dict(meta["Test"]["texture_1"][2]))  # duplicate entry
    (tree / "meta.json").write_text(json.dumps(meta))
    code, out = _run(capsys, str(tree))
    assert code == 1
    problems = [line for line in out.splitlines() if line.startswith("problem ")]
    expected = [
        f"problem missing image: {tree / 'texture_0/test/good/000.png'} (test/texture_0[0])",
        f"problem unreadable image: {tree / 'texture_0/test/good/001.png'} (test/texture_0[1])",
        f"problem size mismatch: {tree / 'texture_0/ground_truth/scratch/000_mask.png'} (test/texture_0[2])",
        f"problem missing mask: {tree / 'texture_0/ground_truth/blob/000_mask.png'} (test/texture_0[3])",
        f"problem duplicate entry: {tree / 'texture_1/test/scratch/000.png'} (test/texture_1[2])",
        f"problem class mismatch: {tree.as_posix()}/texture_1/test/scratch/000.png (test/texture_0[4])",
    ]
    assert len(problems) == len(expected), out
    for line, start in zip(problems, expected, strict=True):
        assert line.startswith(start), (line, start)
    assert "mask is 16x16, image 32x32" in out
    assert "also at test/texture_0[4]" in out
    assert "listed under 'texture_0', cls_name is 'texture_1'" in out
    assert out.splitlines()[-1].startswith("FAILED: 6 problem(s)")


def test_truncated_image_needs_a_full_decode(tree: Path, capsys) -> None:
    path = tree / "texture_1/test/good/000.png"
    path.write_bytes(path.read_bytes()[:100])
    assert _run(capsys, str(tree), "--quick")[0] == 0  # the header is intact
    code, out = _run(capsys, str(tree))
    assert code == 1 and f"unreadable image: {path}" in out


def test_empty_mask_and_cross_split_duplicate_are_notes(tree: Path) -> None:
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tree / "texture_1/ground_truth/blob/000_mask.png")
    meta = json.loads((tree / "meta.json").read_text())
    meta["Train"]["texture_1"].append(meta["Test"]["texture_1"][0])
    (tree / "meta.json").write_text(json.dumps(meta))
    report = validate_path(tree)
    assert report.ok
    assert sorted(note.kind for note in report.notes) == ["empty mask", "in two splits"]


def test_malformed_and_missing_index(tmp_path: Path, capsys) -> None:
    (tmp_path / "meta.json").write_text('{"test": {"a": [{"anomaly": 1}]}}')
    code, out = _run(capsys, str(tmp_path))
    assert code == 1 and "malformed index" in out and "missing or empty 'img_path'" in out
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "no dataset index here" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on a loaded machine
def test_validate_as_a_real_process(tree: Path) -> None:
    (tree / "texture_1/test/blob/000.png").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "vip2clip", "validate", str(tree)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert f"problem missing image: {tree / 'texture_1/test/blob/000.png'}" in result.stdout
