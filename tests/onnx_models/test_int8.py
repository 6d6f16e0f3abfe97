"""INT8 export and the engines' precisions: a tiny export calibrated on a few 64-px images quantizes exactly the
encoder's linear layers, records how it was calibrated, loads with load_onnx and --onnx, and stays close to fp32;
bad calibration inputs are clear errors; accuracy control puts blocks back in fp32; bf16 engines say what runs.
The graph shape that made NNCF fail only at ViT-L/14 (a weight reaching its MatMul through a Transpose) is made on
the tiny export; a missing quantizer package is said before the export starts."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from test_onnx import SIZE, openvino_bf16_units, random_images, sharpened_tiny_model

import vip2clip
from vip2clip.cli import main
from vip2clip.onnx import engine as onnx_engine
from vip2clip.onnx import export as onnx_export
from vip2clip.onnx import quantize as onnx_quantize
from vip2clip.onnx.calibration_images import MIN_CALIBRATION_IMAGES, load_calibration_images
from vip2clip.onnx.quantize import (
    _Fp32Source,
    activation_ranges,
    encoder_linear_nodes,
    fold_constant_transposes,
    revert_blocks,
)
from vip2clip.utils.cpu_features import CpuFeatures, cpu_features

TINY_BLOCKS = 4  # tiny backbone: 4 vision blocks, 4 linear layers each


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("int8")
    model = sharpened_tiny_model(seed=0)
    images = write_images(folder / "good", MIN_CALIBRATION_IMAGES)
    (images / "broken.png").write_bytes(b"not a png")
    path = vip2clip.export_onnx(model, folder / "int8.onnx", quantize="int8", calibration_images=images,
                                int8_method="onnxruntime")  # fmt: skip
    return model, path, folder


@pytest.fixture(scope="module")
def fp32_export(int8_export) -> Path:
    """The fp32 export of the same model with its weights in a side file, as ViT-L/14's are."""
    model, _, folder = int8_export
    return vip2clip.export_onnx(model, folder / "fp32" / "fp32.onnx", external_data=True)


def transpose_fgp_query_weight(source: Path, path: Path) -> int:
    """Write `source` to `path` (weights in a side file) with FGP's query weight reaching each of its MatMuls
    through its own Transpose node: what torch's exporter leaves at ViT-L/14 (node_MatMul_2684, a [768, 768]
    weight it does not constant-fold) and folds at the tiny size. Returns how many MatMuls now read one."""
    model = onnx.load(source)
    weights = {init.name: init for init in model.graph.initializer}
    count = 0
    for node in list(model.graph.node):
        recorded = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        if node.op_type != "MatMul" or "fgp_q_proj_weight" not in recorded or node.input[1] not in weights:
            continue
        if "fgp.q_proj.weight" not in weights:  # the [out, in] weight as torch holds it
            transposed = onnx.numpy_helper.to_array(weights[node.input[1]]).T.copy()
            model.graph.initializer.append(onnx.numpy_helper.from_array(transposed, "fgp.q_proj.weight"))
            weights["fgp.q_proj.weight"] = model.graph.initializer[-1]
        output = f"fgp_q_proj_transposed_{count}"
        model.graph.node.insert(0, onnx.helper.make_node("Transpose", ["fgp.q_proj.weight"], [output], perm=[1, 0]))
        node.input[1] = output
        count += 1
    needed = {name for node in model.graph.node for name in node.input}
    for init in [init for init in model.graph.initializer if init.name not in needed]:
        model.graph.initializer.remove(init)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return count


@pytest.mark.parametrize("smooth_quant", [None, 0.95])
def test_nncf_quantizes_a_graph_whose_weight_goes_through_a_transpose(
    smooth_quant, int8_export, fp32_export, tmp_path, monkeypatch
) -> None:
    # At ViT-L/14 NNCF's SmoothQuant failed on FGP's query projection ('NoneType' object has no attribute 'shape'):
    # it took the Transpose's output for the weight and found no value. The default method (SmoothQuant off) must
    # get through it, and so must SmoothQuant on (NNCF's own default) now that such Transposes are folded.
    if smooth_quant is not None:
        monkeypatch.setattr(onnx_quantize, "NNCF_SMOOTH_QUANT_ALPHA", smooth_quant)
    model, _, folder = int8_export
    source = tmp_path / "transposed" / "fp32.onnx"
    assert transpose_fgp_query_weight(fp32_export, source) >= 1
    path = onnx_export.quantize_onnx(source, tmp_path / "int8.onnx", calibration_images=folder / "good")
    engine = vip2clip.load_onnx(path, backend="onnxruntime")
    assert engine.quantization["method"] == "nncf" and engine.quantization["quantized_layers"] == 4 * TINY_BLOCKS
    images = random_images(2, seed=4)
    expected, got = model.predict(images), engine.predict(images.numpy())
    assert np.abs(got.pred_score - expected.pred_score.numpy()).max() < 0.05
    assert np.corrcoef(got.anomaly_map.ravel(), expected.anomaly_map.numpy().ravel())[0, 1] > 0.95


def test_folding_the_transposes_keeps_the_graph_exact(fp32_export, tmp_path: Path) -> None:
    source = tmp_path / "fp32.onnx"
    count = transpose_fgp_query_weight(fp32_export, source)
    graph = onnx.load(source, load_external_data=False)
    assert fold_constant_transposes(graph, _Fp32Source(source, graph)) == count
    assert not [node for node in graph.graph.node if node.op_type == "Transpose" and node.input[0].startswith("fgp.")]
    onnx.external_data_helper.load_external_data_for_model(graph, str(tmp_path))
    images = random_images(2, seed=3).numpy()
    folded = onnx_quantize._session(graph).run(None, {"images": images})
    exact = onnx_quantize._session(fp32_export).run(None, {"images": images})
    np.testing.assert_allclose(folded[1], exact[1], atol=1e-6)


def test_activation_ranges_are_onnxruntimes_minmax_calibration(int8_export, fp32_export, tmp_path: Path) -> None:
    # The onnxruntime method computes the ranges itself (lean) and hands them to quantize_static: they must be
    # what ORT's own MinMax calibrator gives for the same images.
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator

    _, _, folder = int8_export
    arrays = load_calibration_images([folder / "good"], SIZE).arrays
    graph = onnx.load(fp32_export, load_external_data=False)
    targets = encoder_linear_nodes(graph)
    activations = sorted({node.input[0] for node in graph.graph.node if node.name in targets})
    ours = activation_ranges(fp32_export, graph, activations=activations, arrays=arrays)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.arrays = iter(arrays)

        def get_next(self):
            array = next(self.arrays, None)
            return None if array is None else {"images": array}

    calibrator = create_calibrator(fp32_export, ["MatMul"], augmented_model_path=str(tmp_path / "augmented.onnx"))
    calibrator.collect_data(Reader())
    theirs = calibrator.compute_data()
    for name in activations:
        np.testing.assert_allclose(np.ravel(ours[name]), np.ravel(theirs[name].range_value), rtol=1e-6)


@pytest.mark.parametrize("method", ["nncf", "onnxruntime"])
def test_a_missing_quantizer_is_said_before_the_export(method, monkeypatch, tmp_path: Path, capsys) -> None:
    missing = "nncf" if method == "nncf" else "onnxruntime"
    monkeypatch.setitem(sys.modules, missing, None)  # import nncf / onnxruntime now raises ImportError
    monkeypatch.setattr(onnx_export, "_program", lambda *args: pytest.fail("the slow torch export started"))
    images = write_images(tmp_path / "good", MIN_CALIBRATION_IMAGES)
    args = ["--backbone", "tiny", "--image-size", str(SIZE), "--calibration-images", str(images)]
    assert main(["export", *args, "--int8", "--int8-method", method, "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"needs the {missing!r} package, which is not installed" in err
    if method == "nncf":
        assert "pip install 'vip2clip[int8]'" in err and "use --int8-method onnxruntime" in err
        assert "needs only the onnx extra" in err
    else:
        assert "pip install 'vip2clip[onnx]'" in err
    assert not (tmp_path / "m.onnx").exists()


def test_int8_export_quantizes_the_encoder_linears_and_records_how(int8_export) -> None:
    _, path, _ = int8_export
    graph = onnx.load(path)
    metadata = {entry.key: entry.value for entry in graph.metadata_props}
    assert metadata["vip2clip.precision"] == "int8"
    report = json.loads(metadata["vip2clip.quantization"])
    assert report["method"] == "onnxruntime" and report["calibration_images"] == MIN_CALIBRATION_IMAGES
    assert report["skipped_images"] == 1 and report["quantized_layers"] == 4 * TINY_BLOCKS
    quantized_products = {
        node.name
        for node in graph.graph.node
        if node.op_type == "MatMul" and any(name.endswith("_DequantizeLinear_Output") for name in node.input)
    }
    assert quantized_products == set(encoder_linear_nodes(graph)), "only the encoder's linear layers"
    assert len(quantized_products) == 4 * TINY_BLOCKS


def test_int8_engine_loads_and_stays_close_to_fp32(int8_export) -> None:
    model, path, _ = int8_export
    images = random_images(3, seed=5)
    expected = model.predict(images)
    for backend in ("onnxruntime", "openvino"):
        engine = vip2clip.load_onnx(path, backend=backend, precision="fp32")  # as the file: no bf16 on top
        assert engine.precision == "int8" and engine.file_precision == "int8"
        assert "INT8 encoder linear layers" in engine.describe()
        assert engine.config == model.config and engine.quantization["method"] == "onnxruntime"
        got = engine.predict(images.numpy())
        assert np.abs(got.pred_score - expected.pred_score.numpy()).max() < 0.05
        assert np.corrcoef(got.anomaly_map.ravel(), expected.anomaly_map.numpy().ravel())[0, 1] > 0.95


def test_int8_cli_export_and_onnx_predict(int8_export, tmp_path: Path, capsys) -> None:
    _, path, folder = int8_export
    args = ["--backbone", "tiny", "--image-size", str(SIZE)]
    assert main(["export", *args, "--int8", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--int8 needs --calibration-images" in capsys.readouterr().err
    few = write_images(tmp_path / "few", MIN_CALIBRATION_IMAGES - 1)
    (few / "bad.png").write_bytes(b"broken")
    code = main(["export", *args, "--int8", "--calibration-images", str(few), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and f"needs at least {MIN_CALIBRATION_IMAGES} readable normal images" in err
    assert f"has {MIN_CALIBRATION_IMAGES - 1} (1 unreadable skipped)" in err
    assert not (tmp_path / "m.onnx").exists()
    out = tmp_path / "preds"
    assert (
        main(["predict", str(folder / "good" / "0.png"), "--onnx", str(path), "--out", str(out), "--no-progress"]) == 0
    )
    assert (out / "predictions.csv").is_file()


def test_export_warns_without_vnni(monkeypatch, caplog, tmp_path: Path) -> None:
    monkeypatch.setattr(onnx_export, "cpu_features", lambda: CpuFeatures("Old CPU", frozenset({"avx2"}), True))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="needs at least"):
        onnx_export._calibration("int8", write_images(tmp_path / "two", 2), SIZE)
    assert "without VNNI (Old CPU)" in caplog.text and "run slowly" in caplog.text
    with pytest.raises(ValueError, match="only one is 'int8'"):
        onnx_export._calibration("int4", tmp_path, SIZE)


def test_reverting_every_block_gives_back_the_fp32_graph(int8_export, fp32_export) -> None:
    _, path, _ = int8_export
    fp32_path = fp32_export
    fp32 = _Fp32Source(fp32_path, onnx.load(fp32_path, load_external_data=False))
    targets = encoder_linear_nodes(fp32.graph_only)
    reverted = revert_blocks(fp32, onnx.load(path), targets=targets, blocks=set(range(TINY_BLOCKS)))
    assert not [node for node in reverted.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    images = random_images(2, seed=9).numpy()
    back = onnx_quantize._session(reverted).run(None, {"images": images})
    exact = vip2clip.load_onnx(fp32_path, backend="onnxruntime").predict(images)
    np.testing.assert_allclose(back[1], exact.anomaly_map, atol=1e-5)
    one = revert_blocks(fp32, onnx.load(path), targets=targets, blocks={0})
    assert sum(node.op_type == "DequantizeLinear" for node in one.graph.node) < sum(
        node.op_type == "DequantizeLinear" for node in onnx.load(path).graph.node
    )


def test_accuracy_control_keeps_blocks_in_fp32_until_the_map_agrees(int8_export, tmp_path: Path) -> None:
    model, _, folder = int8_export
    path = vip2clip.export_onnx(model, tmp_path / "controlled.onnx", quantize="int8", int8_method="onnxruntime",
                                calibration_images=folder / "good", max_map_drop=0.0)  # fmt: skip
    report = vip2clip.load_onnx(path, backend="onnxruntime").quantization
    assert report["fp32_blocks"], "a zero drop cannot be met with every block quantized"
    assert report["quantized_layers"] == 4 * (TINY_BLOCKS - len(report["fp32_blocks"]))


def test_bf16_engine_says_what_runs_and_onnxruntime_refuses_bf16(int8_export, tmp_path: Path, capsys) -> None:
    model, int8_path, folder = int8_export
    fp32_path = vip2clip.export_onnx(model, tmp_path / "fp32.onnx")
    engine = vip2clip.load_onnx(fp32_path, precision="bf16")
    bf16 = openvino_bf16_units()  # without, OpenVINO computes in fp32 and the engine says so (issue 27)
    assert (engine.backend, engine.precision) == ("openvino", "bf16" if bf16 else "fp32")
    assert ("running the fp32 file fp32.onnx in bf16" in engine.describe()) == bf16
    assert vip2clip.load_onnx(int8_path, precision="bf16").precision == ("int8+bf16" if bf16 else "int8")
    with pytest.raises(ValueError, match="ONNX Runtime has no bf16 CPU kernels"):
        vip2clip.load_onnx(fp32_path, backend="onnxruntime", precision="bf16")
    out = tmp_path / "preds"
    args = ["predict", str(folder / "good" / "0.png"), "--onnx", str(fp32_path), "--out", str(out), "--no-progress"]
    assert main([*args, "--precision", "bf16", "--onnx-backend", "onnxruntime"]) == 2
    assert "ONNX Runtime has no bf16 CPU kernels" in capsys.readouterr().err
    assert main([*args, "--precision", "fp16"]) == 2
    if cpu_features().bf16:
        assert main([*args, "--precision", "bf16"]) == 0


def test_bf16_that_openvino_does_not_compute_is_reported_as_fp32(int8_export, fp32_export, monkeypatch, caplog):
    """Issue 27 minor: on a CPU where OpenVINO's plugin has no bf16 it ignores the hint and computes in fp32, while
    the engine said bf16. What the compiled model runs is what the engine reports."""
    pytest.importorskip("openvino")
    _, int8_path, _ = int8_export
    fp32_path = fp32_export
    assert vip2clip.load_onnx(fp32_path, precision="bf16").precision == ("bf16" if openvino_bf16_units() else "fp32")
    # What OpenVINO compiles on an AVX2-only CPU: every operation in f32 (the hint ignored).
    monkeypatch.setattr(onnx_engine, "runtime_precisions", lambda compiled: Counter({"f32": 10}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine = vip2clip.load_onnx(fp32_path, precision="bf16")
        int8 = vip2clip.load_onnx(int8_path, precision="bf16")
    assert engine.precision == "fp32" and "but OpenVINO computes in fp32 on this CPU" in engine.describe()
    assert "OpenVINO running the fp32 file fp32.onnx in fp32" in engine.describe()
    assert int8.precision == "int8" and "INT8 layers, the rest fp32" in int8.precision_reason
    assert caplog.text.count("computes in fp32 on this CPU") == 2


def test_the_weights_side_file_gets_the_mode_of_the_other_outputs(tmp_path: Path) -> None:
    """Issue 27 minor: onnx.save writes the external-data file 0o600 (the INT8 export's .data), the .onnx 0o644."""
    weight = onnx.numpy_helper.from_array(np.ones((32, 32), dtype=np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])],
        [weight],
    )
    model, path = onnx.helper.make_model(graph), tmp_path / "m.onnx"

    def write(target: Path, external: bool) -> None:  # as the INT8 export writes its file
        onnx.save(model, target, save_as_external_data=external, location=target.name + ".data")

    umask = os.umask(0o022)
    try:
        onnx_export.save_written(write, path, external_data=True, folder=onnx_export.staging_folder(path))
    finally:
        os.umask(umask)
    assert (path.stat().st_mode & 0o777, (tmp_path / "m.onnx.data").stat().st_mode & 0o777) == (0o644, 0o644)


def test_copies_of_one_image_count_once_for_calibration(tmp_path: Path, caplog) -> None:
    """Issue 27 minor: ten copies of one image counted as ten calibration images."""
    folder = write_images(tmp_path / "good", 1)
    for index in range(1, 10):  # byte copies, and re-saved copies (other bytes, same pixels)
        with Image.open(folder / "0.png") as image:
            image.save(folder / f"copy{index}.png", compress_level=index % 2)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as refused:
        load_calibration_images([folder], SIZE)
    assert "has 1 distinct (9 copies of other images left out)" in str(refused.value)
    assert "9 of 10 images are copies of others (same pixels): calibrating on 1 distinct images" in caplog.text
    others = write_images(tmp_path / "others", MIN_CALIBRATION_IMAGES - 1, seed=1)
    images = load_calibration_images([folder, others], SIZE)
    assert len(images.arrays) == MIN_CALIBRATION_IMAGES and images.copies == 9


def test_int8_method_help_shows_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--int8-method {nncf,onnxruntime} the quantizer (default nncf)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_nncf_quantizes_the_same_layers(int8_export, tmp_path: Path) -> None:
    model, _, folder = int8_export
    path = vip2clip.export_onnx(model, tmp_path / "nncf.onnx", quantize="int8", calibration_images=folder / "good")
    engine = vip2clip.load_onnx(path, backend="onnxruntime")
    assert engine.quantization["method"] == "nncf" and engine.quantization["quantized_layers"] == 4 * TINY_BLOCKS
    images = random_images(2, seed=4)
    expected = model.predict(images)
    got = engine.predict(images.numpy())
    assert np.corrcoef(got.anomaly_map.ravel(), expected.anomaly_map.numpy().ravel())[0, 1] > 0.95
