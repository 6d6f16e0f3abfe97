"""`vip2clip predict --raw-maps`: each anomaly map at the image's size as float16 .npy, listed and resumable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vip2clip.cli import main
from vip2clip.inference.predictor import Predictor
from vip2clip.model.checkpoint import save_checkpoint

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("raw_maps") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, state=tiny_model.trainable_state_dict())


def test_raw_maps_are_written_listed_and_resumed(checkpoint: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "parts"
    (images / "good").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"good/a.png": (70, 40), "good/a.jpg": (33, 90), "b.png": (64, 64)}
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "out"
    args = ["predict", str(images), "--checkpoint", str(checkpoint), "--out", str(out), "--raw-maps", *MODEL_ARGS]
    assert main(args) == 0
    listed = json.loads((out / "predictions.json").read_text())["predictions"]
    rows = {Path(r["path"]).relative_to(images).as_posix(): r for r in listed}
    with (out / "predictions.csv").open(newline="") as stream:
        csv_rows = {Path(r["path"]).relative_to(images).as_posix(): r for r in csv.DictReader(stream)}
    predictor = Predictor.from_checkpoint(checkpoint, backbone="tiny", image_size=64)
    for name, (width, height) in sizes.items():
        assert rows[name]["anomaly_map"] == csv_rows[name]["anomaly_map"]
        raw = np.load(out / rows[name]["anomaly_map"], allow_pickle=False)
        assert raw.dtype == np.float16 and raw.shape == (height, width)
        expected = predictor.predict(images / name)[0].anomaly_map
        np.testing.assert_allclose(raw.astype(np.float32), expected, rtol=1e-3, atol=1e-4)
        assert float(raw.max()) == pytest.approx(rows[name]["max_pixel_score"], rel=1e-3)
    assert rows["good/a.jpg"]["anomaly_map"] == "maps/parts/good/a_jpg.npy"  # next to masks/parts/good/a_jpg.png
    assert not list(out.rglob(".*.tmp"))  # written atomically: no temporary files left

    capsys.readouterr()
    assert main(args) == 0  # resumed: nothing to do
    assert "0 predicted, 3 already done" in capsys.readouterr().out
    (out / rows["b.png"]["anomaly_map"]).unlink()  # a missing map is redone, like a missing mask
    assert main(args) == 0
    assert "1 predicted, 2 already done" in capsys.readouterr().out and (out / rows["b.png"]["anomaly_map"]).is_file()
    # Without --raw-maps the folder was made with other settings: refused (like --no-overlays).
    assert main([a for a in args if a != "--raw-maps"]) == 2
    assert "raw_maps differ" in capsys.readouterr().err


def test_without_raw_maps_the_column_is_empty(checkpoint: Path, tmp_path: Path) -> None:
    Image.new("RGB", (20, 30)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                 *MODEL_ARGS]) == 0  # fmt: skip
    row = json.loads((tmp_path / "o/predictions.json").read_text())["predictions"][0]
    assert row["anomaly_map"] == "" and not (tmp_path / "o/maps").exists()
