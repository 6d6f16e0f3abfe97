"""Bad inputs at the command line (issue 17): images that cannot be judged, self-references, damaged ONNX files,
tiling limits, export destinations, option combinations. Each test failed on the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def _onnx_with_external_data(folder: Path) -> Path:
    """A small valid ONNX model whose weights live in `model.onnx.data` beside it, as `vip2clip export` writes
    large models (the load errors come before any vip2clip metadata is read)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), name="weights")
    graph = helper.make_graph(
        [helper.make_node("Add", ["images", "weights"], ["out"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 64])],
        [weights],
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(helper.make_model(graph), path, save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)  # fmt: skip
    return path


DAMAGED_ONNX = {
    "empty": "is empty (0 bytes): not an ONNX model",
    "random bytes": "is not a readable ONNX model (1,000 bytes): not a protobuf, or truncated",
    "truncated": "is not a readable ONNX model",
    "data missing": "its external data (the weights) is missing at {folder}/model.onnx.data",
    "data truncated": "its external data file {folder}/model.onnx.data is truncated or damaged",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_ONNX))
def test_damaged_onnx_files_exit_2_with_one_line_naming_the_file(tmp_path: Path, damage: str, capsys) -> None:
    """Item 4: a raw onnxruntime traceback and exit 1 ("results written, some not judged") before."""
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "export"
    path = _onnx_with_external_data(folder)
    data = folder / "model.onnx.data"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "data missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1000])
    parts = tmp_path / "parts"
    write_parts(parts, 1)
    expected = f"{path}{'' if damage in ('empty', 'random bytes', 'truncated') else ':'}"
    commands = {
        "predict": ["predict", str(parts), "--out", str(tmp_path / "out"), "--no-progress"],
        "calibrate": ["calibrate", str(parts), "--out", str(tmp_path / "c.json"), "--no-progress"],
        "serve": ["serve", "--port", "0"],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main([*argv, "--onnx", str(path)]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"vip2clip {name}: error: {expected}"), err
        assert DAMAGED_ONNX[damage].format(folder=folder) in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.json").exists()
