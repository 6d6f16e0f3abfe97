"""ONNX export and the ONNX engine: the exported predict equals `model.predict`, carries the model's identity, runs
any batch size, on ONNX Runtime and OpenVINO, behind the Predictor and the CLI's --onnx, and without torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vip2clip
from vip2clip.cli import main
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.inference.predictor import Predictor
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.onnx import engine as onnx_engine
from vip2clip.onnx.engine import MissingDependencyError, choose_precision
from vip2clip.onnx.openvino_precision import ExactHeads, runtime_precisions, split_encoder
from vip2clip.outputs import ImageBatch
from vip2clip.utils.cpu_features import FEATURES_OFF_VARIABLE, CpuFeatures

SIZE = 64
MODEL_ARGS = ["--backbone", "tiny", "--image-size", str(SIZE)]


@dataclass(frozen=True)
class Exported:
    model: ViP2CLIP
    checkpoint: Path
    onnx: Path


def sharpened_tiny_model(seed: int) -> ViP2CLIP:
    """The tiny model with larger prompt and FGP weights than at init: maps and scores that vary, so errors show."""
    model = vip2clip.create_model("tiny", image_size=SIZE, seed=seed, top_k=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    folder = tmp_path_factory.mktemp("onnx")
    model = sharpened_tiny_model(seed=0)
    checkpoint = save_checkpoint(folder / "checkpoint.pt", model.config, state=model.trainable_state_dict())
    return Exported(model, checkpoint, vip2clip.export_onnx(model, folder / "model.onnx", checkpoint=checkpoint))


def random_images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def assert_same_prediction(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual.pred_score), expected.pred_score.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(actual.anomaly_map), expected.anomaly_map.numpy(), atol=1e-4, rtol=0)


def test_exported_predict_equals_model_predict_for_any_batch(exported: Exported) -> None:
    engine = vip2clip.load_onnx(exported.onnx, precision="fp32")  # auto: bf16 on OpenVINO where the CPU has it
    assert not exported.onnx.with_name("model.onnx.data").exists(), "tiny weights belong in one file"
    for batch in (1, 3):  # traced with a batch of 2
        images = random_images(batch, seed=batch)
        expected = exported.model.predict(images)
        assert expected.anomaly_map.std() > 1e-2 and (expected.pred_score - 0.5).abs().max() > 1e-2, "flat outputs"
        actual = engine.predict(images.numpy())
        assert isinstance(actual.pred_score, np.ndarray) and actual.pred_score.dtype == np.float32
        assert actual.pred_score.shape == (batch,) and actual.anomaly_map.shape == (batch, SIZE, SIZE)
        assert_same_prediction(actual, expected)
    as_tensors = engine.predict(images)  # a tensor in gives tensors out, like model.predict
    assert isinstance(as_tensors.anomaly_map, torch.Tensor)
    assert_same_prediction(as_tensors, expected)
    assert engine.predict(np.zeros((0, 3, SIZE, SIZE), np.float32)).anomaly_map.shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"takes images \[B, 3, 64, 64\]; got \(1, 3, 32, 32\)"):
        engine.predict(np.zeros((1, 3, 32, 32), np.float32))


def test_metadata_carries_the_identity_of_the_torch_model(exported: Exported) -> None:
    engine = vip2clip.load_onnx(exported.onnx)
    assert engine.identity == ModelIdentity.of(exported.model, exported.checkpoint)
    assert engine.config == exported.model.config
    assert engine.identity.mismatches(ModelIdentity.of(exported.model, exported.checkpoint)) == []
    assert Predictor(engine).identity == PredictorIdentity(engine.identity)


def test_openvino_reads_the_same_file(exported: Exported) -> None:
    engine = vip2clip.load_onnx(exported.onnx, backend="openvino", precision="fp32")
    assert engine.identity == vip2clip.load_onnx(exported.onnx).identity
    images = random_images(2, seed=7)
    assert_same_prediction(engine.predict(images.numpy()), exported.model.predict(images))


def test_external_data(exported: Exported, tmp_path: Path) -> None:
    path = vip2clip.export_onnx(exported.model, tmp_path / "big.onnx", external_data=True)
    data = tmp_path / "big.onnx.data"
    single_file = exported.onnx.stat().st_size  # the same model in one file
    assert data.stat().st_size > 0.6 * single_file > path.stat().st_size  # small constants stay inline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temporary leftovers
    images = random_images(2, seed=3)
    engine = vip2clip.load_onnx(path, precision="fp32")
    assert_same_prediction(engine.predict(images.numpy()), exported.model.predict(images))


def test_predictor_on_the_engine_equals_predictor_on_the_model(exported: Exported) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 90), (64, 64))]
    on_model = Predictor(exported.model, batch_size=2).predict(images)
    on_engine = Predictor.from_onnx(exported.onnx, batch_size=2, precision="fp32").predict(images)
    for a, b in zip(on_engine, on_model, strict=True):
        assert a.pred_score == pytest.approx(b.pred_score, abs=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-4)


def test_onnx_cli_checks_calibrations_and_refuses_fixed_options(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{index}.png")
    onnx, images = ["--onnx", str(exported.onnx)], str(tmp_path / "images")
    # Calibrated with the torch model of the same checkpoint: accepted by the ONNX engine, and the other way round.
    assert (
        main(
            [
                "calibrate",
                images,
                "--checkpoint",
                str(exported.checkpoint),
                *MODEL_ARGS,
                "--precision",
                "fp32",  # both sides fp32: the thresholds are compared below
                "--out",
                str(tmp_path / "torch.json"),
            ]
        )
        == 0
    )
    assert (
        main(["predict", images, *onnx, "--calibration", str(tmp_path / "torch.json"), "--out", str(tmp_path / "a")])
        == 0
    )
    assert main(["calibrate", images, *onnx, "--precision", "fp32", "--out", str(tmp_path / "onnx.json")]) == 0
    calibrations = [json.loads((tmp_path / name).read_text()) for name in ("torch.json", "onnx.json")]
    assert calibrations[0]["image_threshold"] == pytest.approx(calibrations[1]["image_threshold"], abs=1e-5)
    # Calibrated with another checkpoint: refused.
    other = sharpened_tiny_model(seed=1)
    other_checkpoint = save_checkpoint(tmp_path / "other.pt", other.config, state=other.trainable_state_dict())
    assert (
        main(
            [
                "calibrate",
                images,
                "--checkpoint",
                str(other_checkpoint),
                *MODEL_ARGS,
                "--out",
                str(tmp_path / "other.json"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["predict", images, *onnx, "--calibration", str(tmp_path / "other.json"), "--out", str(tmp_path / "b")])
        == 2
    )
    assert "calibration does not match this model (checkpoint: calibrated with" in capsys.readouterr().err
    # Options the export fixed are refused, not ignored.
    assert main(["predict", images, *onnx, "--checkpoint", str(exported.checkpoint), "--top-k", "2", "--out", "c"]) == 2
    assert "--checkpoint, --top-k cannot be used with it" in capsys.readouterr().err
    # Reference images need the encoder's patch tokens, which the exported graph does not output.
    assert main(["predict", images, *onnx, "--reference", images, "--out", str(tmp_path / "d")]) == 2
    assert "use the PyTorch model for --reference" in capsys.readouterr().err


def test_a_prediction_folder_holds_the_outputs_of_one_engine(exported: Exported, tmp_path: Path, capsys) -> None:
    """Issue 27 item 3: a folder predicted by the torch model was resumed by the ONNX engine ("N predicted, M
    already done": one table of two engines), and predictions.json recorded neither engine nor precision."""
    images, out = tmp_path / "images", str(tmp_path / "out")
    images.mkdir()
    rng = np.random.default_rng(4)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(images / f"{index}.png")
    torch_model = ["--checkpoint", str(exported.checkpoint), *MODEL_ARGS, "--precision", "fp32", "--no-progress"]
    onnx = ["--onnx", str(exported.onnx), "--precision", "fp32", "--no-progress"]
    assert main(["predict", str(images / "0.png"), str(images / "1.png"), *torch_model, "--out", out]) == 0
    written = json.loads((tmp_path / "out/predictions.json").read_text())
    assert written["settings"]["computation"] == {"engine": "torch", "precision": "fp32"}
    capsys.readouterr()
    assert main(["predict", str(images / "0.png"), str(images / "1.png"), *onnx, "--out", out]) == 2
    assert "holds predictions of other settings (computation differ)" in capsys.readouterr().err
    assert main(["predict", str(images), *onnx, "--out", str(tmp_path / "onnx")]) == 0
    written = json.loads((tmp_path / "onnx/predictions.json").read_text())
    engine = written["settings"]["computation"]
    assert engine["engine"] in ("onnxruntime", "openvino") and engine["precision"] == "fp32"
    assert {key: written["run"]["computation"][key] for key in engine} == engine  # and why, in "run"


def test_clear_errors(exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        vip2clip.load_onnx(tmp_path / "missing.onnx")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match=r"plain\.onnx is not a vip2clip ONNX export"):
        vip2clip.load_onnx(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="unknown ONNX backend"):
        vip2clip.load_onnx(exported.onnx, backend="tensorrt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'vip2clip\[onnx\]'"):
        vip2clip.load_onnx(exported.onnx, backend="onnxruntime")
    onnx_args = ["--onnx", str(exported.onnx), "--onnx-backend", "onnxruntime"]
    assert main(["predict", str(tmp_path), *onnx_args, "--out", str(tmp_path / "o")]) == 2


TORCH_FREE = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None  # any `import torch` now fails
    sys.modules["open_clip"] = None
    from vip2clip.cli import main
    from vip2clip.onnx.engine import load_onnx
    from vip2clip.inference.predictor import Predictor

    onnx, image, out = sys.argv[1:]
    engine = load_onnx(onnx, precision="fp32")
    from PIL import Image

    direct = engine.predict(engine.preprocess(Image.open(image))[None])  # the export's own transforms
    results = Predictor(engine).predict([image])
    assert Predictor.from_onnx(onnx).identity.model.checkpoint_sha256
    assert main(["predict", image, "--onnx", onnx, "--out", out, "--no-progress"]) == 0
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "open_clip", "torchvision"))
    result = {"score": results[0].pred_score, "map_sum": float(results[0].anomaly_map.sum()), "loaded": loaded}
    result["direct_score"] = float(direct.pred_score[0])
    print(json.dumps(result))
    """
)


def test_engine_predictor_and_cli_run_without_torch(exported: Exported, tmp_path: Path) -> None:
    image = tmp_path / "part.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(exported.onnx), str(image), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert reply["loaded"] == ["open_clip", "torch"]  # only the blocked entries: nothing imported them for real
    expected = Predictor(exported.model).predict(image)[0]
    assert reply["score"] == pytest.approx(expected.pred_score, abs=1e-5)
    model_input = exported.model.preprocess(Image.open(image))[None]  # the torch model's transforms: the same input
    assert reply["direct_score"] == pytest.approx(float(exported.model.predict(model_input).pred_score[0]), abs=1e-5)
    assert reply["map_sum"] == pytest.approx(float(expected.anomaly_map.sum()), rel=1e-5)
    assert (tmp_path / "out" / "predictions.csv").is_file()


@pytest.mark.slow
def test_export_then_predict_and_calibrate_with_onnx_as_subprocesses(exported: Exported, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "good").mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "good" / f"{index}.png")
    (tmp_path / "model.onnx.data").write_bytes(b"stale weights of an earlier export")
    command = [sys.executable, "-m", "vip2clip"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return result

    model_args = ["--checkpoint", str(exported.checkpoint), *MODEL_ARGS]
    export = run("export", *model_args, "--out", str(tmp_path / "model.onnx"))
    assert "wrote" in export.stdout and "INFO onnx" not in export.stderr
    assert not (tmp_path / "model.onnx.data").exists(), "a stale side file would be read as the weights"
    onnx = ["--onnx", str(tmp_path / "model.onnx"), "--precision", "fp32"]  # compared with fp32 torch below
    run("calibrate", str(tmp_path / "good"), *onnx, "--out", str(tmp_path / "calibration.json"))
    predict = run("predict", str(tmp_path / "good"), *onnx, "--calibration", str(tmp_path / "calibration.json"),
                  "--out", str(tmp_path / "preds"))  # fmt: skip
    assert "4 predicted" in predict.stdout
    rows = json.loads((tmp_path / "preds" / "predictions.json").read_text())["predictions"]
    paths = sorted((tmp_path / "good").iterdir())
    expected = dict(zip(map(str, paths), Predictor(exported.model).predict(paths), strict=True))
    assert sorted(row["path"] for row in rows) == sorted(expected)
    for row in rows:
        assert row["pred_score"] == pytest.approx(expected[row["path"]].pred_score, abs=1e-5)


# OpenVINO bf16 with exact heads (issue 26). bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per
# operation); fp32 keeps 24 (6e-8). After UTPA's 1/0.07 temperature a bf16 similarity moves a probability by
# ~1e-2, so heads in bf16 miss assert_same_prediction's fp32 tolerances (1e-5 score, 1e-4 map) by two orders of
# magnitude, while fp32 heads meet them.
ZEN4 = CpuFeatures("AMD EPYC (Zen 4)", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}), known=True)
AMX = CpuFeatures("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}), known=True)
AVX512 = CpuFeatures("Intel Xeon (Skylake)", frozenset({"avx2", "avx512f", "avx512bw"}), known=True)
AVX2_ONLY = CpuFeatures("AMD EPYC (Zen 2)", frozenset({"avx2", "fma"}), known=True)


def openvino_bf16_units() -> bool:
    """OpenVINO's CPU plugin computes bf16 here (natively, or emulated on AVX-512); without, it runs f32."""
    return "BF16" in pytest.importorskip("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_openvino_bf16_runs_the_heads_in_fp32(exported: Exported) -> None:
    ov = pytest.importorskip("openvino")
    engine = vip2clip.load_onnx(exported.onnx, backend="openvino", precision="bf16")
    # Where OpenVINO has no bf16 (AVX2 only) it computes in fp32, and the engine says so (issue 27).
    assert engine.parts is not None and ("fp32 heads" in engine.describe()) == openvino_bf16_units()
    heads = runtime_precisions(engine.parts.heads)
    assert heads["f32"] > 0 and "bf16" not in heads, heads
    assert runtime_precisions(engine.parts.heads, lambda layer: layer in ("Softmax", "TopK"))["f32"] > 0
    products = runtime_precisions(engine.parts.encoder, lambda layer: layer in ("FullyConnected", "MatMul"))
    if openvino_bf16_units():
        assert set(products) == {"bf16"}, products
    # The heads the engine compiled, fed fp32 encoder outputs, reproduce the torch model to fp32 tolerances.
    core = ov.Core()
    split = split_encoder(core.read_model(str(exported.onnx)))
    assert split is not None and split.blocks == 4  # the tiny backbone's vision blocks
    fp32_parts = ExactHeads(core, split, device="CPU", encoder_hint="f32")
    images = random_images(2, seed=11)
    expected = exported.model.predict(images)
    assert_same_prediction(ImageBatch(*fp32_parts(images.numpy())), expected)  # the cut itself changes nothing
    request = fp32_parts.encoder.create_infer_request()
    request.infer({0: images.numpy()})
    encoder_outputs = [np.array(request.get_output_tensor(i).data) for i in range(len(fp32_parts.encoder.outputs))]
    assert_same_prediction(ImageBatch(*engine.parts.run_heads(images.numpy(), encoder_outputs)), expected)
    if openvino_bf16_units():  # the encoder really computes in bf16: more than fp32 rounding apart
        got = engine.predict(images.numpy())
        assert np.abs(got.anomaly_map - expected.anomaly_map.numpy()).max() > 1e-4


@pytest.mark.parametrize(
    ("features", "expected"), [(ZEN4, "bf16"), (AMX, "bf16"), (AVX512, "fp32"), (AVX2_ONLY, "fp32")]
)
def test_auto_is_exact_heads_bf16_only_on_openvino_with_native_bf16(features, expected, monkeypatch) -> None:
    monkeypatch.setattr(onnx_engine, "cpu_features", lambda: features)
    precision, why = choose_precision("auto", "openvino", file_precision="fp32")
    assert (precision, why.startswith(f"auto: {expected}")) == (expected, True), why
    assert ("bf16: native" in why) == features.bf16
    assert choose_precision("auto", "onnxruntime", file_precision="fp32") == (
        "fp32",
        "auto: fp32 (ONNX Runtime has no bf16 CPU kernels)",
    )
    assert choose_precision("auto", "openvino", file_precision="fp32", device="GPU")[0] == "fp32"
    # An INT8 file: the rest of its encoder in bf16 where fp32 would go bf16 (measured faster, as exact).
    int8_expected = "int8+bf16" if expected == "bf16" else "int8"
    assert choose_precision("auto", "openvino", file_precision="int8")[0] == int8_expected
    assert choose_precision("auto", "onnxruntime", file_precision="int8")[0] == "int8"
    assert choose_precision("fp32", "openvino", file_precision="fp32") == ("fp32", "fp32 as asked (fp32)")
    assert choose_precision("bf16", "openvino", file_precision="int8")[0] == "int8+bf16"
    assert ("emulated" in choose_precision("bf16", "openvino", file_precision="fp32")[1]) == (not features.bf16)


def test_auto_engine_records_its_choice(exported: Exported, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    for features, expected in ((ZEN4, "bf16"), (AVX2_ONLY, "fp32")):
        monkeypatch.setattr(onnx_engine, "cpu_features", lambda features=features: features)
        engine = vip2clip.load_onnx(exported.onnx, backend="openvino")
        runs = expected if openvino_bf16_units() else "fp32"  # what OpenVINO computes on this CPU, said (issue 27)
        assert engine.precision == runs and (engine.parts is not None) == (expected == "bf16")
        assert engine.precision_reason.startswith(f"auto: {expected}")
        assert engine.precision_reason in engine.describe()
    monkeypatch.undo()
    monkeypatch.setenv(FEATURES_OFF_VARIABLE, "bf16")  # the switch hides native bf16 on any CPU
    assert vip2clip.load_onnx(exported.onnx, backend="openvino").precision == "fp32"
    engine = vip2clip.load_onnx(exported.onnx, backend="onnxruntime")
    assert (engine.precision, engine.parts) == ("fp32", None) and "ONNX Runtime" in engine.precision_reason


def test_a_file_whose_encoder_is_not_recognised(exported: Exported, monkeypatch, caplog) -> None:
    pytest.importorskip("openvino")
    monkeypatch.setattr(onnx_engine, "cpu_features", lambda: ZEN4)
    monkeypatch.setattr(onnx_engine, "split_encoder", lambda model: None)  # as for a graph without vision blocks
    engine = vip2clip.load_onnx(exported.onnx, backend="openvino")
    assert (engine.precision, engine.parts) == ("fp32", None) and "not recognised" in engine.precision_reason
    with caplog.at_level(logging.WARNING):
        engine = vip2clip.load_onnx(exported.onnx, backend="openvino", precision="bf16")
    assert engine.precision == ("bf16" if openvino_bf16_units() else "fp32")
    assert ("bf16 heads too" in engine.describe()) == openvino_bf16_units()
    assert "heads cannot be kept in fp32" in caplog.text


def test_openvino_engines_leave_python_signal_handlers_working(exported: Exported) -> None:
    """Each OpenVINO Core's CPU plugin swaps the thread's signal stack and puts the one it found back when it is
    destroyed: two engines on their own Cores, freed in the order they were made, left the thread on an unmapped
    stack, and the next Python signal handler killed the process with SIGSEGV (si_code SI_KERNEL). The suite died
    so in a subprocess wait after the SIGCHLD handler of torch's DataLoader was installed. Engines share one Core."""
    pytest.importorskip("openvino")
    script = f"""
import faulthandler, gc, signal, subprocess, sys
import numpy as np
import vip2clip
faulthandler.enable()  # gives the thread a signal stack, as pytest does
images = np.zeros((1, 3, {SIZE}, {SIZE}), np.float32)
first = vip2clip.load_onnx({str(exported.onnx)!r}, backend="openvino", precision="fp32")
second = vip2clip.load_onnx({str(exported.onnx)!r}, backend="openvino", precision="fp32")
first.predict(images), second.predict(images)
del first; gc.collect()
del second; gc.collect()
signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, run on the thread's signal stack
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("signal handled")
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0 and "signal handled" in process.stdout, (process.returncode, process.stderr[-2000:])
