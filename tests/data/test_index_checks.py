"""The index checks of `vip2clip validate` are those of `test`, `benchmark` and `train` (issue 17 item 3): a
duplicate row was counted twice by `test` (6/6 images became 7/7, the AUROC moved), silently, while `validate`
failed the same index; a path leaving the root passed `validate`. Every command refuses such an index now."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.index import read_index
from vip2clip.data.synthetic import generate_benchmark

MODEL = ["--backbone", "tiny", "--image-size", "32", "--random-init", "--no-progress"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    generate_benchmark(root, classes=1, seed=0, image_size=32, n_train_good=1, n_test_good=3, n_test_defect=3)
    return root


def _edit(root: Path, change) -> None:
    meta = json.loads((root / "meta.json").read_text())
    change(meta["test"]["texture_0"])
    (root / "meta.json").write_text(json.dumps(meta))


PLANTED = {
    "duplicate": (lambda rows: rows.append(dict(rows[-1])), "duplicate entry: "),
    "outside": (lambda rows: rows.append({**rows[0], "img_path": "../outside.png"}), "outside the root: ../outside"),
    "class": (lambda rows: rows.__setitem__(0, {**rows[0], "cls_name": "another"}),
              "listed under 'texture_0', cls_name is 'another'"),
    "mask": (lambda rows: rows.__setitem__(0, {**rows[0], "mask_path": rows[-1]["mask_path"]}),
             "says anomaly 0 but its mask marks defect pixels"),
}  # fmt: skip


@pytest.mark.parametrize("problem", sorted(PLANTED))
def test_validate_and_every_counting_command_refuse_the_same_index(root: Path, problem: str, capsys) -> None:
    change, message = PLANTED[problem]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root.parent / "outside.png")  # exists: only the path is bad
    _edit(root, change)
    commands = {
        "test": ["test", "--data", str(root), "--out", str(root.parent / "test_out"), "--checkpoint", "x.pt", *MODEL],
        "train": ["train", "--data", str(root), "--out", str(root.parent / "train_out"), "--epochs", "1", *MODEL],
        "benchmark": [
            "benchmark",
            "--test",
            f"synthetic={root}",
            "--out",
            str(root.parent / "bench_out"),
            "--checkpoint",
            "x.pt",
            *MODEL,
        ],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert f"{root / 'meta.json'}: 1 problem(s) in the index, refused" in err and message in err, (name, err)
        assert "vip2clip validate" in err
        assert not (root.parent / f"{name}_out").exists() or not any((root.parent / f"{name}_out").rglob("*.json"))
    assert main(["validate", str(root)]) == 1
    assert message in capsys.readouterr().out
    from vip2clip.data.validate import IndexProblemsError, check_index

    with pytest.raises(IndexProblemsError, match="1 problem"):
        check_index(read_index(root))


def test_a_clean_index_and_an_empty_mask_on_a_normal_row_pass(root: Path, capsys) -> None:
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "empty_mask.png")
    _edit(root, lambda rows: rows.__setitem__(0, {**rows[0], "mask_path": "empty_mask.png"}))
    from vip2clip.data.validate import check_index

    check_index(read_index(root))  # no defect pixel: nothing contradicts the label
    assert main(["validate", str(root)]) == 0
