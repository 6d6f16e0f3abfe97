"""EXIF orientation end to end: a portrait photo stored sideways (orientation 6, as phones and many cameras write
it) gives `predict` masks and overlays, and `test` maps, masks and panels, that line up with the photo as viewers
show it: the same outputs as for the upright copy of its pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from native_trees import write_mask, write_with_orientation
from PIL import Image

from vip2clip.cli import main
from vip2clip.inference.predictor import Predictor
from vip2clip.metrics import UndefinedMetricWarning
from vip2clip.model.checkpoint import save_checkpoint

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]
STORED = np.random.default_rng(5).integers(0, 256, (40, 64, 3), dtype=np.uint8)  # 64 wide, 40 high on disk


def _rotated_and_upright(folder: Path, stem: str, suffix: str = ".jpg") -> tuple[Path, Path, np.ndarray]:
    """`STEM.SUFFIX` stored sideways with orientation 6, and `STEM_upright.png`: its pixels as displayed."""
    folder.mkdir(parents=True, exist_ok=True)
    rotated = write_with_orientation(STORED, folder / f"{stem}{suffix}", 6)
    shown = np.rot90(np.asarray(Image.open(rotated).convert("RGB")), k=-1)  # 90 degrees clockwise: 40 wide, 64 high
    upright = folder / f"{stem}_upright.png"
    Image.fromarray(np.ascontiguousarray(shown)).save(upright)
    return rotated, upright, shown


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    return save_checkpoint(
        tmp_path_factory.mktemp("exif") / "c.pt", tiny_model.config, state=tiny_model.trainable_state_dict()
    )


def test_predict_outputs_follow_the_displayed_orientation(checkpoint: Path, tmp_path: Path) -> None:
    rotated, upright, shown = _rotated_and_upright(tmp_path / "photos", "part")
    # A pixel threshold in the middle of the map, so that the masks have both values and show where they point.
    middle = float(np.median(Predictor.from_checkpoint(checkpoint, backbone="tiny").predict(shown)[0].anomaly_map))
    out = tmp_path / "out"
    args = [str(tmp_path / "photos"), "--checkpoint", str(checkpoint), "--pixel-threshold", str(middle)]
    assert main(["predict", *args, "--out", str(out), *MODEL_ARGS]) == 0
    rows = {Path(row["path"]).name: row for row in json.loads((out / "predictions.json").read_text())["predictions"]}
    first, second = rows[rotated.name], rows[upright.name]
    assert (first["width"], first["height"]) == (second["width"], second["height"]) == (40, 64)
    assert first["pred_score"] == pytest.approx(second["pred_score"], abs=1e-6)
    for column in ("pred_mask", "overlay"):
        ours, reference = (np.asarray(Image.open(out / row[column])) for row in (first, second))
        assert ours.shape[:2] == (64, 40)
        np.testing.assert_array_equal(ours, reference)
    mask = np.asarray(Image.open(out / first["pred_mask"]))
    assert 0 < (mask > 0).mean() < 1


@pytest.mark.filterwarnings("ignore", category=UndefinedMetricWarning)  # two images: PRO may be undefined
def test_test_maps_masks_and_panels_follow_the_displayed_orientation(checkpoint: Path, tmp_path: Path) -> None:
    outputs = {}
    for variant in ("rotated", "upright"):
        root = tmp_path / variant / "widget"  # the `convert folder` layout: good/, DEFECT/, ground_truth/DEFECT/
        # PNG with an EXIF block: the panels show the file name, which must be the same in both datasets.
        rotated, upright, _ = _rotated_and_upright(tmp_path / variant / "photos", "1", ".png")
        (root / "good").mkdir(parents=True)
        (root / "dent").mkdir()
        Image.fromarray(np.ascontiguousarray(STORED[:, ::-1])).save(root / "good" / "0.png")
        defect = rotated if variant == "rotated" else upright
        defect.rename(root / "dent" / f"1{defect.suffix}")
        write_mask(root / "ground_truth" / "dent" / "1_mask.png", size=(40, 64), box=(5, 3, 30, 20))  # as displayed
        assert main(["convert", "folder", "--root", str(root)]) == 0
        out = tmp_path / variant / "out"
        args = ["test", "--data", str(root), "--checkpoint", str(checkpoint), "--out", str(out), "--save-maps"]
        assert main([*args, *MODEL_ARGS]) == 0  # before EXIF support: "mask is 40x64 but its image is 64x40"
        outputs[variant] = out
    results = {variant: json.loads((out / "results.json").read_text())["classes"] for variant, out in outputs.items()}
    assert results["rotated"] == results["upright"]
    panels = {variant: sorted((out / "maps").rglob("*.png")) for variant, out in outputs.items()}
    assert [p.name for p in panels["rotated"]] == [p.name for p in panels["upright"]] and panels["rotated"]
    for ours, reference in zip(panels["rotated"], panels["upright"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(reference)))
