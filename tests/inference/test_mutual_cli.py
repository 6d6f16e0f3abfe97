"""`vip2clip predict/calibrate/test --mutual`: groups, what the results record, resuming, calibration and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import save_checkpoint

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("mutual") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, tiny_model.trainable_state_dict())


def _save_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(folder / f"{k}.png")


def test_predict_scores_each_folder_as_a_group_and_records_it(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _save_images(tmp_path / "parts/a", 3, seed=1)
    _save_images(tmp_path / "parts/b", 4, seed=2)
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--mutual"]
    out = tmp_path / "out"
    assert main(["predict", *args, "--mutual-others", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images scored each other" in printed
    written = json.loads((out / "predictions.json").read_text())
    assert written["settings"]["mutual_group"] == "folder"
    assert written["settings"]["model"]["mutual"]["max_others"] == 2
    groups = {Path(g["group"]).name: g for g in written["run"]["mutual_groups"]}
    assert {name: (g["images"], g["others_per_image"]) for name, g in groups.items()} == {"a": (3, 2), "b": (4, 2)}
    assert all(0.0 <= g["alike_share"] <= 1.0 for g in groups.values())
    assert len(written["predictions"]) == 7 and all(row["pred_label"] != "error" for row in written["predictions"])
    # Resuming after one more image in b: the whole of b is scored again (4 + 1 images), a is kept.
    _save_images(tmp_path / "parts/b2", 0, seed=0)
    Image.fromarray(np.zeros((48, 56, 3), dtype=np.uint8)).save(tmp_path / "parts/b/extra.png")
    assert main(["predict", *args, "--mutual-others", "2", "--out", str(out)]) == 0
    assert "5 predicted, 3 already done" in capsys.readouterr().out


def test_groups_of_fewer_than_three_images_are_refused(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _save_images(tmp_path / "parts/a", 3, seed=1)
    _save_images(tmp_path / "parts/small", 2, seed=2)
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--mutual"]
    assert main(["predict", *args, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "at least 3 images per group" in error and "small (2)" in error and "--mutual-group all" in error
    assert not (tmp_path / "out" / "predictions.csv").exists()
    assert main(["predict", *args, "--mutual-group", "all", "--out", str(tmp_path / "all")]) == 0
    groups = json.loads((tmp_path / "all/predictions.json").read_text())["run"]["mutual_groups"]
    assert [(g["group"], g["images"], g["others_per_image"]) for g in groups] == [("all", 5, 4)]


def test_calibration_made_with_mutual_scoring_is_kept_to_it(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _save_images(tmp_path / "good", 4, seed=3)
    _save_images(tmp_path / "parts", 3, seed=4)
    model = ["--checkpoint", str(checkpoint), *MODEL_ARGS]
    calibration = str(tmp_path / "c.json")
    assert main(["calibrate", str(tmp_path / "good"), *model, "--mutual", "--out", calibration]) == 0
    assert json.loads(Path(calibration).read_text())["model"]["mutual"]["share"] == 0.3
    args = [str(tmp_path / "parts"), *model, "--calibration", calibration]
    assert main(["predict", *args, "--mutual", "--out", str(tmp_path / "o1")]) == 0
    capsys.readouterr()
    assert main(["predict", *args, "--out", str(tmp_path / "o2")]) == 2
    assert "mutual scoring: calibrated with share 0.3" in capsys.readouterr().err


def test_onnx_engine_is_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    assert main(["predict", str(tmp_path), "--onnx", "model.onnx", "--mutual", "--out", str(tmp_path / "o")]) == 2
    assert "the exported ONNX graph does not output" in capsys.readouterr().err


def test_mutual_test_lifts_the_pixel_auroc_of_the_demo_model(demo_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "structured"
    generate_benchmark(data, classes=1, seed=113, style="structured", n_train_good=0, n_test_good=7, n_test_defect=3)
    args = ["test", "--data", str(data), "--checkpoint", str(demo_checkpoint), "--backbone", "tiny", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "zero")]) == 0
    assert main([*args, "--out", str(tmp_path / "mutual"), "--mutual"]) == 0
    zero, mutual = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("zero", "mutual"))
    assert mutual["mean"]["pixel_auroc"] >= zero["mean"]["pixel_auroc"] + 0.05
    assert mutual["model"]["mutual"]["weight"] == 0.75 and zero["model"]["mutual"] is None
    calibration = json.loads((tmp_path / "mutual/calibration.json").read_text())
    assert calibration["model"]["mutual"] == mutual["model"]["mutual"]  # for predict --mutual
    assert "mutual scoring: each class's test images scored each other" in (tmp_path / "mutual/results.md").read_text()
