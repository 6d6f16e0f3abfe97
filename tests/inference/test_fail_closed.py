"""Fail closed: NaN/inf model output is never "normal", thresholds outside [0, 1] are refused, every JSON we write
is strict, and `predict` results describe exactly the files of the latest run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vip2clip.cli import main
from vip2clip.inference import calibration as calib
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.inference.predictor import Predictor, make_result
from vip2clip.inference.thresholds import Thresholds
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.identity import ModelIdentity

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> dict[str, Path]:
    """A working checkpoint and one whose weights are NaN (as a diverged training run leaves)."""
    folder = tmp_path_factory.mktemp("fail_closed")
    state = tiny_model.trainable_state_dict()
    broken = {key: torch.full_like(value, math.nan) if value.is_floating_point() else value
              for key, value in state.items()}  # fmt: skip
    return {
        "ok": save_checkpoint(folder / "ok.pt", tiny_model.config, state=state),
        "nan": save_checkpoint(folder / "nan.pt", tiny_model.config, state=broken),
    }


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (what strict parsers in other languages do)."""

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def write_parts(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        paths.append(folder / f"part_{number}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def predict(*args: str) -> int:
    return main(["predict", *args, *MODEL_ARGS])


def test_nan_output_is_an_error_never_normal(checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_parts(tmp_path / "parts", 3)
    out = tmp_path / "out"
    assert predict(str(tmp_path / "parts"), "--checkpoint", str(checkpoints["nan"]), "--out", str(out)) == 1
    captured = capsys.readouterr()
    assert "3 images found: 0 predicted, 0 already done, 0 unreadable, 3 not judged" in captured.out
    assert "0 of 0 judged images are anomalous" in captured.out and "exit code 1" in captured.err
    data = strict_json((out / "predictions.json").read_text())
    assert [row["pred_label"] for row in data["predictions"]] == ["error"] * 3
    assert all("NaN or infinite model output" in row["error"] and row["pred_score"] is None
               for row in data["predictions"])  # fmt: skip
    assert len(data["failed"]) == 3
    csv_rows = (out / "predictions.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == 3 and all(row.split(",")[1:3] == ["", "error"] for row in csv_rows)  # no score, "error"
    for line in (out / "predictions.jsonl").read_text().splitlines():
        strict_json(line)
    assert not list(out.rglob("*.png"))  # no mask, no overlay: nothing to look at that could pass for a decision

    model_result = Predictor.from_checkpoint(checkpoints["nan"], backbone="tiny").predict(np.zeros((32, 32, 3)))[0]
    assert model_result.pred_label is None and not model_result.is_judged and model_result.verdict == "error"


def test_a_partly_nan_map_is_an_error() -> None:
    anomaly_map = np.full((4, 5), 0.2, dtype=np.float32)
    anomaly_map[1, 2] = np.inf
    result = make_result(0.1, anomaly_map, thresholds=Thresholds(0.5, 0.5, "t"))
    assert result.pred_label is None and "1 of 20 map values" in result.error
    assert not result.pred_mask.any() and math.isnan(result.defect_area)
    assert make_result(0.1, np.zeros((2, 2)), thresholds=Thresholds(0.5, 0.5, "t")).pred_label is False


def test_calibrate_refuses_nan_scores_naming_the_files(checkpoints, tmp_path: Path, capsys) -> None:
    parts = write_parts(tmp_path / "good", 2)
    args = ["calibrate", str(tmp_path / "good"), "--checkpoint", str(checkpoints["nan"]), "--out",
            str(tmp_path / "c.json"), *MODEL_ARGS]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "NaN or infinite scores or maps for 2 of 2 image(s)" in err and all(str(p) in err for p in parts)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "inf"])
def test_thresholds_outside_0_1_are_refused(value: str, checkpoints, tmp_path: Path, capsys) -> None:
    write_parts(tmp_path / "parts", 1)
    for flag in ("--threshold", "--pixel-threshold"):
        code = predict(str(tmp_path / "parts"), "--checkpoint", str(checkpoints["ok"]), flag, value, "--out",
                       str(tmp_path / "out"))  # fmt: skip
        assert code == 2
        assert "must be a number in [0, 1]" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"image threshold must be a number in \[0, 1\]"):
        Thresholds(float(value), 0.5, "t")


def test_calibration_files_with_bad_thresholds_are_refused(tiny_model, tmp_path: Path) -> None:
    good = calib.make_calibration(
        PredictorIdentity(ModelIdentity.of(tiny_model)),
        image_threshold=0.3,
        pixel_threshold=0.4,
        method=calib.METHOD_F1,
        n_images=3,
    ).to_dict()
    for bad in ("1.5", "NaN", "-1"):  # NaN: what a non-strict JSON writer leaves
        path = tmp_path / "c.json"
        path.write_text(json.dumps(good).replace('"pixel_threshold": 0.4', f'"pixel_threshold": {bad}'))
        with pytest.raises(ValueError, match=r"c\.json: invalid calibration: pixel_threshold.*in \[0, 1\]"):
            calib.load(path)


def test_results_describe_exactly_the_files_of_the_latest_run(checkpoints, tmp_path: Path, capsys) -> None:
    first, second = write_parts(tmp_path / "a", 3), write_parts(tmp_path / "b", 2, seed=1)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoints["ok"]), "--out", str(out)]
    assert predict(str(tmp_path / "a"), *args) == 0

    def rows() -> dict[str, dict]:
        return {row["path"]: row for row in strict_json((out / "predictions.json").read_text())["predictions"]}

    masks = {path: out / rows()[str(path)]["pred_mask"] for path in first}
    # A deleted file's row and outputs go; a file that became unreadable gets an "error" row, its old outputs go.
    first[0].unlink()
    first[1].write_bytes(b"\x89PNG\r\n\x1a\n broken now")
    assert predict(str(tmp_path / "a"), *args) == 1
    now = rows()
    assert set(now) == {str(first[1]), str(first[2])} and now[str(first[1])]["pred_label"] == "error"
    assert not masks[first[0]].exists() and not masks[first[1]].exists() and masks[first[2]].exists()
    assert len((out / "predictions.csv").read_text().splitlines()) == 3
    capsys.readouterr()
    # Another input folder into the same --out: refused, nothing changes.
    assert predict(str(tmp_path / "b"), *args) == 2
    assert "holds predictions of other inputs" in capsys.readouterr().err and set(rows()) == set(now)
    # --overwrite: a new result set with b's files only; a's outputs are removed.
    assert predict(str(tmp_path / "b"), *args, "--overwrite") == 0
    assert set(rows()) == {str(path) for path in second} and not masks[first[2]].exists()
    assert sorted(p.name for p in (out / "masks").rglob("*.png")) == ["part_0_png.png", "part_1_png.png"]


def test_predict_skips_masks_of_a_convert_folder_layout(checkpoints, tmp_path: Path, capsys) -> None:
    root = tmp_path / "widget"
    write_parts(root / "good", 2)
    write_parts(root / "scratch", 1)
    mask = root / "ground_truth" / "scratch" / "part_0_mask.png"
    mask.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(mask)
    assert predict(str(root), "--checkpoint", str(checkpoints["ok"]), "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "note: skipped 1 mask file(s)" in out and "3 images found" in out
    search = strict_json((tmp_path / "out" / "predictions.json").read_text())["search"]
    assert search == {"masks_skipped": 1, "unreadable_folders": [], "links_not_followed": []}
