"""Predictor (PIL / path / array inputs, original-size maps) and `vip2clip predict` / `vip2clip calibrate`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vip2clip
from vip2clip.cli import main
from vip2clip.data.files import find_images
from vip2clip.data.images import BadImageError, load_image
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.inference import calibration as calib
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.inference.predictor import Predictor
from vip2clip.inference.thresholds import Thresholds, resolve_thresholds
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.identity import ModelIdentity
from vip2clip.runs.journal import output_name
from vip2clip.runs.run_outputs import panel_threshold_source
from vip2clip.visualization.panel import layout_panel

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("predict") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, state=tiny_model.trainable_state_dict())


@pytest.fixture(scope="module")
def predictor(tiny_model) -> Predictor:
    return Predictor(tiny_model, Thresholds(0.5, 0.5, "test"), batch_size=3)


def bilinear_reference(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Naive bilinear resize with half-pixel centres (align_corners=False), edges clamped."""

    def axis(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source = np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(int), in_size - 1)
        return low, np.minimum(low + 1, in_size - 1), source - low

    r0, r1, rw = axis(height, values.shape[0])
    c0, c1, cw = axis(width, values.shape[1])
    top = values[r0][:, c0] * (1 - cw) + values[r0][:, c1] * cw
    bottom = values[r1][:, c0] * (1 - cw) + values[r1][:, c1] * cw
    return top * (1 - rw[:, None]) + bottom * rw[:, None]


def _rgb(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_maps_are_in_original_size_and_match_model(predictor: Predictor, tiny_model, tmp_path: Path) -> None:
    pixels = _rgb(90, 50, 0)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    inputs = [Image.fromarray(pixels), tmp_path / "a.png", str(tmp_path / "a.png"), pixels, pixels / 255.0]
    results = predictor.predict(inputs)
    reference = tiny_model.predict(vip2clip.preprocess(Image.fromarray(pixels), 64)[None])
    expected_map = bilinear_reference(reference.anomaly_map[0].double().numpy(), 50, 90)
    for result in results:
        assert result.anomaly_map.shape == result.pred_mask.shape == (50, 90)
        assert result.size == (90, 50)
        assert result.pred_score == pytest.approx(float(reference.pred_score[0]), abs=1e-5)
        np.testing.assert_allclose(result.anomaly_map, expected_map, atol=1e-5)
        np.testing.assert_array_equal(result.pred_mask, result.anomaly_map >= 0.5)
        assert result.defect_area == pytest.approx(result.pred_mask.mean())
        assert result.max_pixel_score == pytest.approx(result.anomaly_map.max())
        assert result.pred_label is (result.pred_score >= 0.5)


def test_single_input_grey_rgba_and_batching(predictor: Predictor) -> None:
    grey = np.random.default_rng(1).integers(0, 256, (33, 47), dtype=np.uint8)
    rgba = np.dstack([_rgb(20, 30, 2), np.zeros((30, 20), np.uint8)])
    single = predictor.predict(Image.fromarray(grey))
    assert len(single) == 1 and single[0].anomaly_map.shape == (33, 47)
    as_rgb = predictor.predict(np.repeat(grey[..., None], 3, axis=-1))[0]
    np.testing.assert_allclose(single[0].anomaly_map, as_rgb.anomaly_map, atol=1e-6)
    # Alpha is dropped, not composited (as for files).
    np.testing.assert_allclose(
        predictor.predict(Image.fromarray(rgba, "RGBA"))[0].anomaly_map,
        predictor.predict(rgba[..., :3])[0].anomaly_map,
        atol=1e-6,
    )
    images = [_rgb(40 + i, 30, i) for i in range(5)]
    batched = predictor.predict(images)
    one_by_one = predictor.with_thresholds(predictor.thresholds)
    one_by_one.batch_size = 1
    for many, one in zip(batched, one_by_one.predict(images), strict=True):
        assert many.pred_score == pytest.approx(one.pred_score, abs=1e-5)
        np.testing.assert_allclose(many.anomaly_map, one.anomaly_map, atol=1e-5)


def test_thresholds_decide(tiny_model) -> None:
    image = _rgb(32, 32, 3)
    everything = Predictor(tiny_model, Thresholds(0.0, 0.0, "t")).predict(image)[0]
    assert everything.pred_label is True and everything.pred_mask.all() and everything.defect_area == 1.0
    nothing = Predictor(tiny_model, Thresholds(1.0, 1.0, "t")).predict(image)[0]
    assert nothing.pred_label is False and not nothing.pred_mask.any() and nothing.defect_area == 0.0
    middle = float(np.median(everything.anomaly_map))
    half = Predictor(tiny_model, Thresholds(0.5, middle, "t")).predict(image)[0]
    assert 0.3 < half.defect_area < 0.7


def test_bad_inputs(predictor: Predictor, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        predictor.predict(broken)
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match=r"0\.\.255"):
        predictor.predict(np.full((4, 4), 300, np.int32))
    with pytest.raises(TypeError, match="path, a PIL image or a numpy array"):
        predictor.predict([3.5])


def test_resolve_thresholds(tiny_model, checkpoint: Path, tmp_path: Path) -> None:
    identity = PredictorIdentity(ModelIdentity.of(tiny_model, checkpoint))
    default = resolve_thresholds(identity)
    assert (default.image, default.pixel) == (0.5, 0.5) and "uncalibrated" in default.source
    saved = calib.make_calibration(
        identity, image_threshold=0.3, pixel_threshold=0.4, method=calib.METHOD_F1, n_images=4
    ).save(tmp_path / "c.json")
    from_file = resolve_thresholds(identity, saved)
    assert (from_file.image, from_file.pixel) == (0.3, 0.4) and "c.json" in from_file.source
    mixed = resolve_thresholds(identity, saved, pixel_threshold=0.9)
    assert (mixed.image, mixed.pixel) == (0.3, 0.9)
    with pytest.raises(ValueError, match="does not match this model"):
        resolve_thresholds(PredictorIdentity(ModelIdentity.of(tiny_model)), saved)


@pytest.mark.parametrize(("missing", "flag"), [("image", "--threshold"), ("pixel", "--pixel-threshold")])
def test_a_calibration_without_one_threshold_needs_it_explicitly(
    missing: str, flag: str, tiny_model, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    identity = PredictorIdentity(ModelIdentity.of(tiny_model, checkpoint))
    thresholds = {"image_threshold": 0.3, "pixel_threshold": 0.4, f"{missing}_threshold": None}
    saved = calib.make_calibration(identity, method=calib.METHOD_F1, n_images=4, **thresholds).save(tmp_path / "c.json")
    with pytest.raises(ValueError, match=f"c\\.json has no {missing} threshold.*{flag}"):
        resolve_thresholds(identity, saved)
    given = resolve_thresholds(identity, saved, **{f"{missing}_threshold": 0.8})
    assert (given.image, given.pixel) == ((0.8, 0.4) if missing == "image" else (0.3, 0.8))
    Image.fromarray(_rgb(40, 40, 9)).save(tmp_path / "one.png")
    args = [str(tmp_path / "one.png"), "--checkpoint", str(checkpoint), "--calibration", str(saved)]
    assert _predict(*args, "--out", str(tmp_path / "refused")) == 2
    assert f"has no {missing} threshold" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert _predict(*args, flag, "0.8", "--out", str(tmp_path / "out")) == 0
    settings = json.loads((tmp_path / "out" / "predictions.json").read_text())["settings"]
    assert settings[f"{missing}_threshold"] == 0.8 and "c.json" in settings["thresholds_source"]


def test_find_images(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for name in ("b.png", "a.JPG", "sub/deeper/c.tiff", "sub/d.webp", "notes.txt", ".hidden.png", ".cache/e.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (tmp_path / "odd.dat").write_bytes(b"x")
    out = root / "results"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "b_png.png").write_bytes(b"x")
    found = find_images([root, tmp_path / "odd.dat", root / "b.png"], exclude=out)
    assert [image.key for image in found] == [
        "in/a.JPG",
        "in/b.png",
        "in/sub/d.webp",
        "in/sub/deeper/c.tiff",
        "odd.dat",
    ]
    assert all(image.path.is_absolute() for image in found)
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images([tmp_path / "missing"])
    assert output_name("in/a.JPG") == "in/a_jpg.png" and output_name("in/a.png") == "in/a_png.png"


def make_mixed_folder(root: Path) -> dict[str, tuple[int, int]]:
    """Good and defective synthetic images (two levels deep), grey, RGBA, a corrupt file; -> readable sizes."""
    bench = generate_benchmark(root.parent / "bench", classes=1, image_size=80, n_test_good=2, n_test_defect=2)
    sizes = {}
    for number, sample in enumerate(sample for samples in bench.splits["test"].values() for sample in samples):
        target = root / ("nested/deeper" if number % 2 else "") / f"{sample.specie_name}_{number}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bench.root / sample.img_path, target)
        sizes[str(target)] = (80, 80)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8)).save(root / "grey.png")
    sizes[str(root / "grey.png")] = (70, 50)
    Image.fromarray(np.dstack([_rgb(30, 40, 5), np.full((40, 30), 128, np.uint8)]), "RGBA").save(root / "rgba.png")
    sizes[str(root / "rgba.png")] = (30, 40)
    Image.fromarray(_rgb(45, 35, 6)).save(root / "nested" / "photo.JPG", format="JPEG")
    sizes[str(root / "nested" / "photo.JPG")] = (45, 35)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "readme.txt").write_text("not an image, not a candidate")
    return sizes


def _predict(*extra: str) -> int:
    return main(["predict", *extra, *MODEL_ARGS, "--no-progress"])


def test_predict_folder_and_resume(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sizes = make_mixed_folder(tmp_path / "images")
    out = tmp_path / "out"
    # Exit code 1: the results are written, but one file could not be judged.
    assert _predict(str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--out", str(out)) == 1
    printed = capsys.readouterr().out
    assert f"{len(sizes) + 1} images found: {len(sizes)} predicted, 0 already done, 1 unreadable" in printed
    assert "corrupt.png" in printed

    rows = json.loads((out / "predictions.json").read_text())
    corrupt = str(tmp_path / "images" / "corrupt.png")
    assert sorted(row["path"] for row in rows["predictions"]) == sorted([*sizes, corrupt])
    assert [entry["path"] for entry in rows["failed"]] == [corrupt]
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert csv_lines[0].startswith("path,pred_score,pred_label,max_pixel_score,defect_area,width,height")
    assert len(csv_lines) == len(sizes) + 2  # header, the readable images, the corrupt file's "error" row
    error_row = next(row for row in rows["predictions"] if row["path"] == corrupt)
    assert error_row["pred_label"] == "error" and error_row["error"] and error_row["pred_score"] is None
    for row in (row for row in rows["predictions"] if row["path"] != corrupt):
        mask = np.asarray(Image.open(out / row["pred_mask"]))
        assert mask.shape[::-1] == sizes[row["path"]] == (row["width"], row["height"])
        assert set(np.unique(mask)) <= {0, 255}
        assert row["defect_area"] == pytest.approx((mask > 0).mean())
        assert Image.open(out / row["overlay"]).size == sizes[row["path"]]
        assert row["pred_label"] == ("anomalous" if row["pred_score"] >= 0.5 else "normal")

    mtimes = {path: path.stat().st_mtime_ns for path in (out / "masks").rglob("*.png")}
    assert _predict(str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--out", str(out)) == 1
    assert f"0 predicted, {len(sizes)} already done, 1 unreadable" in capsys.readouterr().out
    assert mtimes == {path: path.stat().st_mtime_ns for path in (out / "masks").rglob("*.png")}

    # A changed image is redone; so is one whose mask went missing; others stay.
    changed = tmp_path / "images" / "grey.png"
    Image.fromarray(np.zeros((50, 70), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    next(iter(mtimes)).unlink()
    assert _predict(str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--out", str(out)) == 1
    assert f"2 predicted, {len(sizes) - 2} already done" in capsys.readouterr().out

    (tmp_path / "images" / "corrupt.png").unlink()  # every image judged now: exit code 0
    assert _predict(str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite") == 0
    assert f"{len(sizes)} predicted, 0 already done, 0 unreadable" in capsys.readouterr().out


def _killed_while_writing(out: Path, lines: list[str]) -> int:
    """As if killed after two images, in the middle of writing the third line, before the tables."""
    (out / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    (out / "predictions.csv").unlink()
    return 2


def _killed_under_torchrun(out: Path, lines: list[str]) -> int:
    """As a 2-rank run killed before rank 0 merged the ranks' journals: two records in predictions.rank1.jsonl."""
    (out / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (out / "predictions.rank1.jsonl").write_text("\n".join(lines[2:4]) + "\n")
    return 3


@pytest.mark.parametrize("kill", [_killed_while_writing, _killed_under_torchrun])
def test_interrupted_run_resumes(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kill) -> None:
    sizes = make_mixed_folder(tmp_path / "images")
    out = tmp_path / "out"
    args = [str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--out", str(out)]
    assert _predict(*args) == 1  # corrupt.png
    done = kill(out, (out / "predictions.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert _predict(*args) == 1
    assert f"{len(sizes) - done} predicted, {done} already done" in capsys.readouterr().out
    assert len((out / "predictions.csv").read_text().splitlines()) == len(sizes) + 2
    assert not list(out.glob("predictions.rank*.jsonl"))
    run = json.loads((out / "predictions.json").read_text())["run"]
    assert (run["world_size"], run["device"], run["computation"]["engine"]) == (1, "cpu", "torch")


def test_predict_refuses_other_settings(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(_rgb(40, 40, 9)).save(tmp_path / "one.png")
    args = [str(tmp_path / "one.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    assert _predict(*args) == 0
    assert _predict(*args, "--threshold", "0.9") == 2
    assert "other settings (image_threshold differ)" in capsys.readouterr().err
    # fp32 and bf16 scores differ: one folder holds one computation (whatever auto chose the first time)
    first = json.loads((tmp_path / "out" / "predictions.json").read_text())["settings"]["computation"]
    other = "fp32" if first["precision"] == "bf16" else "bf16"
    assert _predict(*args, "--precision", other) == 2
    assert "other settings (computation differ)" in capsys.readouterr().err
    assert _predict(*args, "--precision", first["precision"]) == 0
    assert _predict(str(tmp_path / "one.png"), "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert _predict(str(tmp_path / "nowhere"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _predict(str(empty), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o2")) == 2
    assert "no images (.bmp" in capsys.readouterr().err


def test_calibrate_cli_then_predict(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_mixed_folder(tmp_path / "good")
    out = tmp_path / "calibration.json"
    args = ["calibrate", str(tmp_path / "good"), "--checkpoint", str(checkpoint), "--out", str(out), *MODEL_ARGS]
    assert main([*args, "--quantile", "0.9", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning: calibrating on only 7 normal images" in captured.err
    assert "corrupt.png" in captured.out
    loaded = calib.load(out)
    assert (loaded.method, loaded.n_images, loaded.quantile, loaded.identity.model.image_size) == (
        "normal-quantile",
        7,
        0.9,
        64,
    )

    # The same thresholds from the Python side, from the same images, in the precision the command chose.
    assert loaded.computation["engine"] == "torch" and loaded.computation["why"].startswith("auto: ")
    precision = loaded.computation["precision"]
    model = vip2clip.create_model("tiny", checkpoint=checkpoint, image_size=64, precision=precision)
    readable = [p for p in find_images([tmp_path / "good"]) if p.path.name != "corrupt.png"]
    scored = list(Predictor(model).score(readable, lambda image: load_image(image.path)))
    scores, maps = np.array([s.pred_score for s in scored]), np.stack([s.anomaly_map for s in scored])
    assert loaded.image_threshold == pytest.approx(np.quantile(scores, 0.9), abs=1e-6)
    assert loaded.pixel_threshold == pytest.approx(np.quantile(maps.astype(np.float64), 0.999), abs=1e-6)

    target = [str(tmp_path / "good" / "grey.png"), "--checkpoint", str(checkpoint), "--calibration", str(out)]
    assert _predict(*target, "--out", str(tmp_path / "pred")) == 0
    settings = json.loads((tmp_path / "pred" / "predictions.json").read_text())["settings"]
    assert settings["image_threshold"] == loaded.image_threshold
    assert main(["predict", *target, "--out", str(tmp_path / "p2"), "--backbone", "tiny", "--image-size", "96"]) == 2
    assert "image size: calibrated with 64, model uses 96" in capsys.readouterr().err
    assert main(["predict", *target, "--out", str(tmp_path / "p3"), *MODEL_ARGS, "--sigma", "2"]) == 2
    assert "sigma: calibrated with 8.0, model uses 2.0" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_and_calibrate_as_subprocesses(checkpoint: Path, tmp_path: Path) -> None:
    sizes = make_mixed_folder(tmp_path / "images")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "vip2clip"]
    calibrate = subprocess.run(
        [*command, "calibrate", str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--out",
         str(tmp_path / "c.json"), *MODEL_ARGS],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert calibrate.returncode == 0, calibrate.stderr
    predict = subprocess.run(
        [*command, "predict", str(tmp_path / "images"), "--checkpoint", str(checkpoint), "--calibration",
         str(tmp_path / "c.json"), "--out", str(tmp_path / "out"), *MODEL_ARGS],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert predict.returncode == 1, predict.stderr  # corrupt.png could not be judged
    assert f"{len(sizes)} predicted, 0 already done, 1 unreadable" in predict.stdout
    assert len((tmp_path / "out" / "predictions.csv").read_text().splitlines()) == len(sizes) + 2


@pytest.mark.slow
def test_calibrated_decisions_beat_chance(
    trained_tiny_checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint, unseen = trained_tiny_checkpoint.checkpoint, trained_tiny_checkpoint.unseen
    classes = list(unseen.splits["test"])
    model_args = ["--checkpoint", str(checkpoint), "--backbone", "tiny", "--no-progress"]
    good = [str(unseen.root / name / "train" / "good") for name in classes]
    assert main(["calibrate", *good, "--out", str(tmp_path / "c.json"), *model_args]) == 0
    test = [str(unseen.root / name / "test") for name in classes]
    assert (
        main(["predict", *test, "--calibration", str(tmp_path / "c.json"), "--out", str(tmp_path / "o"), *model_args])
        == 0
    )
    rows = json.loads((tmp_path / "o" / "predictions.json").read_text())["predictions"]
    truth = {
        str((unseen.root / s.img_path).resolve()): s for samples in unseen.splits["test"].values() for s in samples
    }
    labels = np.array([truth[row["path"]].anomaly for row in rows])
    flagged = np.array([row["pred_label"] == "anomalous" for row in rows])
    balanced_accuracy = (flagged[labels == 1].mean() + (~flagged[labels == 0]).mean()) / 2
    # Pixel decisions: the written masks against the ground truth, pooled over the test images.
    hits = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    for row in rows:
        sample = truth[row["path"]]
        predicted = np.asarray(Image.open(tmp_path / "o" / row["pred_mask"])) > 0
        actual = (
            np.asarray(Image.open(unseen.root / sample.mask_path)) > 0 if sample.mask_path else np.zeros_like(predicted)
        )
        hits["tp"] += int((predicted & actual).sum())
        hits["fn"] += int((~predicted & actual).sum())
        hits["fp"] += int((predicted & ~actual).sum())
        hits["tn"] += int((~predicted & ~actual).sum())
    tpr, fpr = hits["tp"] / (hits["tp"] + hits["fn"]), hits["fp"] / (hits["fp"] + hits["tn"])
    print(f"balanced accuracy {balanced_accuracy:.3f}, pixel TPR {tpr:.3f}, FPR {fpr:.3f}")
    assert balanced_accuracy >= 0.65
    assert tpr > 0.3 and tpr > 3 * fpr
    assert torch.isfinite(torch.tensor([tpr, fpr])).all()


def test_predict_panels_and_their_threshold_source(checkpoint: Path, tmp_path: Path, capsys) -> None:
    image = tmp_path / "images" / "part.png"
    image.parent.mkdir()
    Image.fromarray(_rgb(80, 60, seed=3)).save(image)
    out = tmp_path / "out"
    assert _predict(str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--panels") == 0
    assert "panels/" in capsys.readouterr().out
    row = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert row["panel"] == "panels/part_png.png"
    assert Image.open(out / row["panel"]).size == layout_panel((80, 60), 3).size  # caption, decision, scale
    (out / row["panel"]).unlink()  # a missing panel is redone on the next run, like a missing mask
    assert _predict(str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--panels") == 0
    assert "1 predicted, 0 already done" in capsys.readouterr().out and (out / row["panel"]).is_file()
    assert _predict(str(image), "--checkpoint", str(checkpoint), "--out", str(out)) == 2  # other settings
    assert "panels" in capsys.readouterr().err
    assert panel_threshold_source(Thresholds(0.5, 0.5, "default 0.5 (uncalibrated)")) == ""
    assert panel_threshold_source(Thresholds(0.7, 0.5, "default 0.5 (uncalibrated)")) == "given"  # --threshold 0.7
    assert panel_threshold_source(Thresholds(0.6, 0.4, "calibration c.json (f1, 9 images)")) == "calibration"
