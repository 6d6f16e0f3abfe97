"""Bad inputs at the command line (issue 17): images that cannot be judged, self-references, damaged ONNX files,
tiling limits, export destinations, option combinations. Each test failed on the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.cli import main

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress", "--random-init"]


def write_parts(folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        paths.append(folder / f"part_{number}.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_nan_float_tiff_and_animated_webp_get_error_rows_never_normal(tmp_path: Path, capsys) -> None:
    """Items 1 and 6: a float TIFF with one NaN pixel was judged "normal" (an all-black image), exit 0; an animated
    WebP was judged on its first frame, silently."""
    parts = tmp_path / "parts"
    write_parts(parts, 1)
    values = np.full((40, 48), 0.5, np.float32)
    values[5, 5] = np.nan
    Image.fromarray(values).save(parts / "float_nan.tif")
    frames = [Image.fromarray(np.full((40, 48, 3), level, np.uint8)) for level in (0, 200)]
    frames[0].save(parts / "anim.webp", save_all=True, append_images=frames[1:])
    assert main(["predict", str(parts), "--out", str(tmp_path / "out"), *MODEL_ARGS]) == 1
    rows = {Path(row["path"]).name: row for row in json.loads((tmp_path / "out/predictions.json").read_text())[
        "predictions"]}  # fmt: skip
    assert rows["part_0.png"]["pred_label"] in ("normal", "anomalous")
    assert rows["float_nan.tif"]["pred_label"] == "error" and rows["float_nan.tif"]["pred_score"] is None
    assert "1 of 1920 pixels are NaN or infinite (F image): it cannot be judged" in rows["float_nan.tif"]["error"]
    assert rows["anim.webp"]["pred_label"] == "error"
    assert "animated WEBP image with 2 frames: only single images are judged" in rows["anim.webp"]["error"]
    assert "float_nan.tif" in capsys.readouterr().out
