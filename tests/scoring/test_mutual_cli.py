"""`vip2clip predict/calibrate/test --mutual`: groups, what the results record, resuming, calibration and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vip2clip import MutualRule, Predictor, create_model
from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import save_checkpoint

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]
THRESHOLDS = ["--threshold", "0.3", "--pixel-threshold", "0.3"]  # mutual scores are not judged against 0.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("mutual") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, state=tiny_model.trainable_state_dict())


def _save_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(folder / f"{k}.png")


def test_predict_scores_each_folder_as_a_group_and_records_it(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _save_images(tmp_path / "parts/a", 3, seed=1)
    _save_images(tmp_path / "parts/b", 4, seed=2)
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--mutual", *THRESHOLDS]
    args += ["--mutual-group", "folder"]
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
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--mutual", *THRESHOLDS]
    out = str(tmp_path / "out")
    assert main(["predict", *args, "--mutual-group", "folder", "--out", out]) == 2
    error = capsys.readouterr().err
    assert "at least 3 images per group" in error and "small (2)" in error and "--mutual-group all" in error
    assert not (tmp_path / "out").exists()  # refused before writing: nothing blocks the corrected command
    # The default: the images the run is given score each other (the usual good/ + defect/ layout is one batch).
    assert main(["predict", *args, "--out", out]) == 0
    groups = json.loads((tmp_path / "out/predictions.json").read_text())["run"]["mutual_groups"]
    assert [(g["group"], g["images"], g["others_per_image"]) for g in groups] == [("all", 5, 4)]
    assert main(["predict", str(tmp_path / "parts/small"), *args[1:], "--out", str(tmp_path / "o2")]) == 2
    error = capsys.readouterr().err
    assert "too few in: all (2); give the run more images of the part" in error and "--mutual-group" not in error


def test_a_stopped_run_that_judged_nothing_does_not_block_other_settings(checkpoint: Path, tmp_path: Path) -> None:
    _save_images(tmp_path / "parts", 3, seed=1)
    out = tmp_path / "out"
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--out", str(out)]
    assert main(["predict", *args]) == 0
    (out / "predictions.csv").unlink()  # as a run stopped after its journal's settings line, before any image
    (out / "predictions.jsonl").write_text((out / "predictions.jsonl").read_text().splitlines()[0] + "\n")
    assert main(["predict", *args, "--mutual", *THRESHOLDS]) == 0


def test_mutual_scores_are_not_judged_against_the_uncalibrated_default(demo_checkpoint: Path, tmp_path: Path, capsys):
    data = tmp_path / "set"
    generate_benchmark(data, classes=1, seed=113, style="structured", n_train_good=4, n_test_good=8, n_test_defect=8)
    model = ["--checkpoint", str(demo_checkpoint), "--backbone", "tiny", "--no-progress", "--mutual"]
    test_images, out = str(data / "object_0/test"), tmp_path / "out"
    assert main(["predict", test_images, *model, "--mutual-group", "all", "--out", str(out)]) == 2  # was 0: 0 of
    # the 8 defects flagged (fused scores 0.30-0.47 under the default 0.5)
    assert "vip2clip calibrate GOOD_DIR --mutual" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="mutual scoring needs calibrated thresholds"):
        Predictor.from_checkpoint(demo_checkpoint, backbone="tiny", mutual=MutualRule())
    engine = create_model("tiny", checkpoint=demo_checkpoint)
    with pytest.raises(ValueError, match="mutual scoring needs calibrated thresholds"):
        Predictor(engine, mutual=MutualRule()).predict([np.zeros((32, 32, 3), np.uint8)] * 3)
    # Calibrated on normal images of the part, as docs/mutual.md's first example: the defects are flagged.
    calibration = str(tmp_path / "calibration.json")
    assert main(["calibrate", str(data / "object_0/train/good"), *model, "--out", calibration]) == 0
    assert main(["predict", test_images, *model, "--calibration", calibration, "--out", str(out)]) == 0
    rows = json.loads((out / "predictions.json").read_text())["predictions"]
    defects = [row["pred_label"] for row in rows if "/good/" not in row["path"]]
    assert defects == ["anomalous"] * 8


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


def test_explain_is_refused_with_mutual_scoring(checkpoint: Path, tmp_path: Path, capsys) -> None:
    _save_images(tmp_path / "parts", 3, seed=1)
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--mutual", *THRESHOLDS]
    assert main(["predict", *args, "--explain", "--out", str(tmp_path / "o")]) == 2  # was 0: the zero-shot score
    assert "--explain shows the plain model's layers and prompts; not with --mutual" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    test = ["test", "--data", str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--mutual"]
    assert main([*test, "--save-maps", "--explain", "--out", str(tmp_path / "t")]) == 2  # the same contradiction
    assert "not with --mutual" in capsys.readouterr().err


def test_test_classes_of_fewer_than_three_images_are_named_with_advice_for_test(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "set"
    generate_benchmark(data, classes=2, seed=1, n_train_good=0, n_test_good=1, n_test_defect=1, image_size=64)
    test = ["test", "--data", str(data), "--checkpoint", str(checkpoint), *MODEL_ARGS, "--out", str(tmp_path / "t")]
    assert main([*test, "--mutual"]) == 2
    error = capsys.readouterr().err
    assert "class texture_0 (2), class texture_1 (2); add test images to those classes" in error
    assert "--classes" in error
    assert "--mutual-group" not in error


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
