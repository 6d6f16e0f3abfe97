"""Bad inputs at the command line (issue 17): images that cannot be judged, self-references, damaged ONNX files,
tiling limits, export destinations, option combinations. Each test failed on the code before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vip2clip
from vip2clip.cli import main
from vip2clip.data.images import BadImageError

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


def _rows(out: Path) -> dict[str, dict]:
    return {Path(row["path"]).name: row for row in json.loads((out / "predictions.json").read_text())["predictions"]}


def test_an_image_is_never_its_own_reference(tmp_path: Path, capsys) -> None:
    """Item 2: `predict parts/ --reference parts/` compared each image with itself (every patch at distance 0):
    every defect scored like a normal part. Now an image that is a reference is compared with the others only:
    its results equal those with a reference folder that lacks it, from a fresh memory and from the cache."""
    parts, others, alone = tmp_path / "parts", tmp_path / "others", tmp_path / "alone"
    write_parts(parts, 3, seed=3)
    others.mkdir()
    alone.mkdir()
    for name in ("part_1.png", "part_2.png"):
        shutil.copy(parts / name, others / name)
    shutil.copy(parts / "part_0.png", alone / "copy_of_part_0.png")
    common = ["--reference-cache", str(tmp_path / "cache"), "--raw-maps", *MODEL_ARGS]
    assert main(["predict", str(parts), "--reference", str(parts), "--out", str(tmp_path / "self"), *common]) == 0
    assert "note: 3 of the 3 images are reference images too: each was compared with the other references only" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "self/predictions.json").read_text())["run"]["self_references"] == 3
    one = str(parts / "part_0.png")
    assert main(["predict", one, "--reference", str(others), "--out", str(tmp_path / "others_out"), *common]) == 0
    assert main(["predict", one, "--reference", str(parts), "--out", str(tmp_path / "cached"), *common]) == 0  # cache
    expected = _rows(tmp_path / "others_out")["part_0.png"]
    expected_map = np.load(tmp_path / "others_out" / expected["anomaly_map"])
    for run in ("self", "cached"):
        row = _rows(tmp_path / run)["part_0.png"]
        assert row["pred_score"] == pytest.approx(expected["pred_score"], abs=1e-5), run
        np.testing.assert_allclose(np.load(tmp_path / run / row["anomaly_map"]), expected_map, atol=2e-3)
    # The only reference (a copy, same pixels): nothing to compare with, an error row, never a score.
    assert main(["predict", one, "--reference", str(alone), "--out", str(tmp_path / "alone_out"), *common]) == 1
    row = _rows(tmp_path / "alone_out")["part_0.png"]
    assert row["pred_label"] == "error" and "it is the only reference image" in row["error"]


def test_tile_size_and_count_are_bounded_and_overlap_needs_tile(tmp_path: Path, capsys) -> None:
    """Item 7: `--tile 1` was accepted (16,384 model calls for a 128-px image, 20 million for 20 MP, and the tile
    list alone gigabytes); `--tile-overlap` without `--tile` was silently ignored."""
    parts = tmp_path / "parts"
    write_parts(parts, 1, size=(128, 128))
    out = ["--out", str(tmp_path / "out"), *MODEL_ARGS]
    for argv, message in (
        (
            ["--tile", "1"],
            "--tile / --tile-overlap: tile size must be >= 32 pixels, got 1 (each tile is one model call",
        ),
        (["--tile-overlap", "0.5"], "--tile-overlap needs --tile SIZE (without --tile the whole image is scored"),
    ):
        assert main(["predict", str(parts), *argv, *out]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    from vip2clip.data.images import BadImageError
    from vip2clip.scoring.tiling import MAX_TILES, TileConfig, tile_boxes

    with pytest.raises(BadImageError, match=r"big.png: 20000x20000 pixels would need 609,961 tiles of 32 px \(overlap "
                       r"0.2\); the limit is 4,096 tiles"):  # fmt: skip
        tile_boxes((20000, 20000), TileConfig(32, 0.2), name="big.png")  # refused before any list is built
    assert len(tile_boxes((2048, 2048), TileConfig(32, 0.0))) == MAX_TILES  # 64 x 64: at the limit, allowed
    # An image over the limit is an error row (the others are judged), never a run that takes days.
    Image.fromarray(np.zeros((2100, 2100, 3), np.uint8)).save(parts / "huge.png")
    assert main(["predict", str(parts), "--tile", "32", "--tile-overlap", "0", *out]) == 1
    rows = _rows(tmp_path / "out")
    assert "2100x2100 pixels would need 4,356 tiles of 32 px" in rows["huge.png"]["error"]
    assert rows["part_0.png"]["pred_label"] in ("normal", "anomalous")


def test_export_errors_name_the_destination_not_a_temporary_file(tmp_path: Path, capsys) -> None:
    """Item 8: "/tmp/ro/.m.onnx.opqkyjda: Read-only file system", "[Errno 28] No space left on device" or "problem
    writing element 7168 to file": the temporary file or no path at all; an existing folder as --out unexplained."""
    pytest.importorskip("onnxscript")
    import resource

    import torch

    model = ["--backbone", "tiny", "--random-init", "--image-size", "32"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    for out, problem in (
        (tmp_path / "folder", "is a folder; --out is the .onnx file to write (e.g. FOLDER/model.onnx)"),
        (tmp_path / "afile" / "m.onnx", f"cannot write the ONNX export there ({tmp_path / 'afile'} is a file)"),
    ):
        assert main(["export", "--out", str(out), *model]) == 2
        err = capsys.readouterr().err
        assert f"vip2clip export: error: {out}: {problem}" in err and ".m.onnx." not in err, err
    # A write that fails part-way (a file size limit, as a disk that fills up): the destination named, the free
    # space said, the earlier file kept, no temporary folder left.
    from vip2clip.onnx.export import save_program, staging_folder

    program = torch.onnx.export(torch.nn.Linear(512, 512).eval(), (torch.randn(2, 512),), dynamo=True, verbose=False)
    target = tmp_path / "models" / "m.onnx"
    target.parent.mkdir()
    target.write_bytes(b"the earlier export")
    folder = staging_folder(target)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError, match=r"cannot write the ONNX export \(.*MiB free there\)") as raised:
            save_program(program, target, external_data=True, folder=folder)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert raised.value.filename == str(target) and str(folder) not in str(raised.value)
    assert target.read_bytes() == b"the earlier export" and not (tmp_path / "models" / "m.onnx.data").exists()


def test_onnx_refuses_cuda_it_cannot_use_and_a_reference_cache_it_cannot_use(tmp_path: Path, capsys) -> None:
    """Item 9: `--onnx --device cuda` without a CUDA-capable onnxruntime ran on the CPU with only onnxruntime's own
    warning; `--reference-cache` with `--onnx` was silently ignored."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime can use CUDA")
    parts = tmp_path / "parts"
    write_parts(parts, 1)
    model = _onnx_with_external_data(tmp_path / "export")  # refused before it is loaded
    out = ["--out", str(tmp_path / "out"), "--onnx", str(model), "--no-progress"]
    assert main(["predict", str(parts), *out, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda with --onnx: ONNX Runtime cannot run on CUDA here (it offers " in err
    assert "CPUExecutionProvider" in err
    assert "Drop --device to run on the CPU" in err
    assert main(["predict", str(parts), *out, "--reference-cache", str(tmp_path / "cache")]) == 2
    assert "--reference-cache cannot be used with --onnx: reference images need the encoder's patch tokens" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_texts_say_the_checkpoints_defaults_and_every_default(capsys) -> None:
    """Items 14 and 15: `predict --help` said "(default ViT-L-14-336)" and "(default 518)" while the checkpoint's
    own backbone and size are used; --tile-overlap gave no default; `demo --device` had no help."""
    for command in ("predict", "calibrate", "serve", "test"):
        text = _help(capsys, command)
        assert "(default: the checkpoint's backbone; ViT-L-14-336 without a checkpoint)" in text, command
        assert "(default: the size the checkpoint was trained at; without one 518, 128 for the tiny" in text, command
        assert "(default ViT-L-14-336)" not in text and "(default 518)" not in text
        assert "share of a tile its neighbours overlap, with --tile (default 0.25)" in text
    assert "--device DEVICE where the demo trains and predicts: cpu, cuda, cuda:1 (cpu)" in _help(capsys, "demo")


def test_images_too_small_or_too_thin_to_judge_get_error_rows(tmp_path: Path, capsys) -> None:
    """Issue 27: 1x1 and 1x300 images were judged "normal" without a warning (the resize to the model's square
    input stretches a pixel into a whole image); the explain panel of a 1x300 image was unreadable."""
    parts = tmp_path / "parts"
    write_parts(parts, 1)
    for name, (height, width) in {"dot.png": (1, 1), "line.png": (300, 1), "strip.png": (40, 400)}.items():
        Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(parts / name)
    assert main(["predict", str(parts), "--out", str(tmp_path / "out"), *MODEL_ARGS]) == 1
    rows = {Path(row["path"]).name: row for row in json.loads((tmp_path / "out/predictions.json").read_text())[
        "predictions"]}  # fmt: skip
    assert rows["part_0.png"]["pred_label"] in ("normal", "anomalous")
    assert "1x1 pixels: a side shorter than one patch of the model (16 pixels)" in rows["dot.png"]["error"]
    assert "1x300 pixels: a side shorter than one patch" in rows["line.png"]["error"]
    assert "400x40 pixels: too thin to judge (sides 10.0:1, more than the model's patch grid 4.0:1" in rows[
        "strip.png"]["error"] and "--tile SIZE near its short side (40)" in rows["strip.png"]["error"]  # fmt: skip
    assert all(rows[name]["pred_label"] == "error" for name in ("dot.png", "line.png", "strip.png"))
    assert "line.png" in capsys.readouterr().out
    # Tiles near its short side judge the strip; the Python API refuses before any work, naming the input.
    assert main(["predict", str(parts / "strip.png"), "--tile", "40", "--out", str(tmp_path / "t"), *MODEL_ARGS]) == 0
    predictor = vip2clip.Predictor(vip2clip.create_model("tiny", image_size=64, seed=0))
    with pytest.raises(BadImageError, match="input 1: 1x300 pixels: a side shorter than one patch"):
        predictor.predict([np.zeros((40, 48, 3), np.uint8), np.zeros((300, 1, 3), np.uint8)])
