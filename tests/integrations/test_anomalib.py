"""ViP²-CLIP inside anomalib: anomalib's own Engine, data modules (Folder, MVTecAD), metrics, visualizer, export and
OpenVINOInferencer on synthetic data, against `vip2clip test` and `Predictor` on the same images.

anomalib's Engine and Lightning start slowly, so one module-scoped fixture makes every run once (zero-shot test
and predict on a Folder layout, few-shot test on the MVTec layout, a Folder without masks, an OpenVINO export) and
the tests below only compare what they produced.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vip2clip.cli import main as vip2clip_main
from vip2clip.data.images import load_image
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.transforms import preprocess_mask, resize_image
from vip2clip.integrations.anomalib_support import SUPPORTED_RANGE, check_version, require_anomalib

IMAGE_SIZE = 80  # the images' size; the trained tiny model runs at 96 px, so every image and mask is resized
SHOTS = 2


@dataclass
class Runs:
    ckpt: Path
    mvtec: Path
    folder: Path
    ours: dict  # `vip2clip test` results.json, zero-shot
    ours_few: dict  # `vip2clip test --shots 2`
    zero: dict  # anomalib Engine.test metrics, Folder, zero-shot
    few: dict  # anomalib Engine.test metrics, MVTecAD, k_shot=2
    no_masks: dict  # anomalib Engine.test metrics, Folder without masks
    few_references: list[str]  # the file names of the few-shot model's references
    predictions: list  # anomalib Engine.predict batches, Folder
    exported: Path  # anomalib's OpenVINO export
    ours_16bit: dict  # `vip2clip test` on the same images as 16-bit grey PNGs
    zero_16bit: dict  # anomalib Engine.test metrics on them, Folder
    visualizer_images: list[Path]
    log: list[str]


def _folder_layout(mvtec_class: Path, out: Path) -> Path:
    """The synthetic class copied into an anomalib Folder layout: train_good/, good/, defect/ and mask/ (the defect
    kinds merged, named KIND_NNN so that images and masks pair by name as Folder requires)."""
    for name, source in (("train_good", "train/good"), ("good", "test/good")):
        shutil.copytree(mvtec_class / source, out / name)
    (out / "defect").mkdir()
    (out / "mask").mkdir()
    for kind in sorted(p.name for p in (mvtec_class / "test").iterdir() if p.name != "good"):
        for image in sorted((mvtec_class / "test" / kind).iterdir()):
            shutil.copy(image, out / "defect" / f"{kind}_{image.name}")
            mask = mvtec_class / "ground_truth" / kind / f"{image.stem}_mask.png"
            shutil.copy(mask, out / "mask" / f"{kind}_{image.name}")
    return out


def _sixteen_bit_copy(source: Path, out: Path) -> Path:
    """The MVTec layout at `source` with every image saved as 16-bit grey (I;16, grey level x 257); masks kept."""
    shutil.copytree(source, out)
    for path in sorted(out.rglob("*.png")):
        if "ground_truth" not in path.parts:
            grey = np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257
            Image.fromarray(grey).save(path)
            assert Image.open(path).mode == "I;16"
    return out


def _vip2clip_test(data: Path, ckpt: Path, out: Path, *extra: str) -> dict:
    args = ["test", "--data", str(data), "--checkpoint", str(ckpt), "--random-init", "--out", str(out), "--no-progress"]
    assert vip2clip_main([*args, *extra]) == 0
    return json.loads((out / "results.json").read_text())


def _engine(root: Path, **options):
    from anomalib.engine import Engine

    return Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, **options)  # fmt: skip


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, trained_tiny_checkpoint) -> Runs:
    from anomalib.data import Folder, MVTecAD
    from torchvision.transforms.v2 import Resize

    from vip2clip.integrations.anomalib import ViP2CLIP

    root = tmp_path_factory.mktemp("anomalib")
    ckpt = trained_tiny_checkpoint.checkpoint
    generate_benchmark(root / "mvtec", classes=1, seed=5, image_size=IMAGE_SIZE, n_train_good=4, n_test_good=4,
                       n_test_defect=4)  # fmt: skip
    folder = _folder_layout(root / "mvtec" / "texture_0", root / "folder")
    ours = _vip2clip_test(root / "mvtec", ckpt, root / "ours")
    ours_few = _vip2clip_test(root / "mvtec", ckpt, root / "ours_few", "--shots", str(SHOTS), "--reference-cache",
                              str(root / "cache_ours"))  # fmt: skip
    ours_16bit = _vip2clip_test(_sixteen_bit_copy(root / "mvtec", root / "mvtec16_ours"), ckpt, root / "ours16")
    loader = {"train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    folder_module = Folder(name="synthetic", root=folder, normal_dir="train_good", normal_test_dir="good",
                           abnormal_dir="defect", mask_dir="mask", val_split_mode="same_as_test", **loader)  # fmt: skip
    records = _Records()
    logging.getLogger("vip2clip").addHandler(records)
    try:
        # fp32 as `vip2clip test` computes (the default, auto, is bf16 on CPUs with native bf16)
        model = ViP2CLIP(checkpoint=ckpt, precision="fp32")
        engine = _engine(root / "engine")
        zero = engine.test(model, datamodule=folder_module, verbose=False)[0]
        predictions = engine.predict(model, datamodule=folder_module)
        # Exported from a bf16 model: the graph is fp32 all the same (the runtime chooses how to compute it)
        bf16 = ViP2CLIP(checkpoint=ckpt, precision="bf16", visualizer=False)
        exported = engine.export(bf16, "openvino", export_root=root / "export")
        cache = root / "cache_anomalib"
        few_model = ViP2CLIP(checkpoint=ckpt, k_shot=SHOTS, reference_cache=cache, visualizer=False, precision="fp32")
        mvtec_module = MVTecAD(root=root / "mvtec", category="texture_0", val_split_mode="same_as_test", **loader)
        few = engine.test(few_model, datamodule=mvtec_module, verbose=False)[0]
        no_mask_module = Folder(name="no_masks", root=folder, normal_dir="train_good", normal_test_dir="good",
                                abnormal_dir="defect", val_split_mode="same_as_test",
                                test_augmentations=Resize((64, 64)), **loader)  # fmt: skip
        bare = ViP2CLIP(checkpoint=ckpt, visualizer=False, precision="fp32")
        no_masks = engine.test(bare, datamodule=no_mask_module, verbose=False)[0]
        # anomalib's own reader clips 16-bit pixels to white (image AUROC 0.5); ViP2CLIP reads them as vip2clip does
        folder_16bit = _folder_layout(_sixteen_bit_copy(root / "mvtec", root / "mvtec16") / "texture_0", root / "f16")
        module_16bit = Folder(name="sixteen", root=folder_16bit, normal_dir="train_good", normal_test_dir="good",
                              abnormal_dir="defect", mask_dir="mask", val_split_mode="same_as_test",
                              **loader)  # fmt: skip
        zero_16bit = engine.test(model, datamodule=module_16bit, verbose=False)[0]
    finally:
        logging.getLogger("vip2clip").removeHandler(records)
    images = sorted((root / "engine").rglob("images/**/*.png"))
    few_references = [Path(path).name for path, _ in few_model.model.references.files]
    return Runs(ckpt, root / "mvtec", folder, ours, ours_few, zero, few, no_masks, few_references, predictions,
                exported, ours_16bit, zero_16bit, images, records.lines)  # fmt: skip


def _class_metrics(results: dict) -> dict:
    return results["classes"][0]


def test_default_precision_is_what_auto_picks_here(runs: Runs) -> None:
    from vip2clip.integrations.anomalib import ViP2CLIP
    from vip2clip.model.vip2clip import resolve_precision

    network = ViP2CLIP(checkpoint=runs.ckpt, visualizer=False).model.network
    assert (network.precision, network.precision_reason) == resolve_precision("auto", "cpu")


def test_engine_test_equals_vip2clip_test(runs: Runs) -> None:
    ours = _class_metrics(runs.ours)
    assert abs(runs.zero["image_AUROC"] - ours["image_auroc"]) < 1e-3
    assert abs(runs.zero["pixel_AUROC"] - ours["pixel_auroc"]) < 1e-3
    assert abs(runs.zero["image_F1Score"] - ours["image_f1"]) < 1e-3  # `>=` at anomalib's F1-adaptive threshold
    assert abs(runs.zero["pixel_F1Score"] - ours["pixel_f1"]) < 1e-3
    assert 0.5 < ours["pixel_auroc"] < 1  # a model that learned, not a flat one
    assert runs.visualizer_images, "anomalib's visualizer wrote no images"


def test_16_bit_images_score_as_in_vip2clip_test(runs: Runs) -> None:
    ours = _class_metrics(runs.ours_16bit)
    assert abs(runs.zero_16bit["image_AUROC"] - ours["image_auroc"]) < 1e-3  # 0.5 when read as white
    assert abs(runs.zero_16bit["pixel_AUROC"] - ours["pixel_auroc"]) < 1e-3
    assert 0.5 < ours["pixel_auroc"] < 1


def test_a_mask_of_another_size_is_refused_as_vip2clip_test_refuses_it(runs: Runs, tmp_path: Path) -> None:
    from anomalib.data import Folder

    from vip2clip.data.images import BadImageError
    from vip2clip.integrations.anomalib import ViP2CLIP

    folder = shutil.copytree(runs.folder, tmp_path / "folder")
    mask = sorted((folder / "mask").glob("*.png"))[0]
    Image.open(mask).resize((IMAGE_SIZE, IMAGE_SIZE // 2)).save(mask)  # another aspect: it would be stretched
    module = Folder(name="stretched", root=folder, normal_dir="train_good", normal_test_dir="good",
                    abnormal_dir="defect", mask_dir="mask", val_split_mode="same_as_test", num_workers=0)  # fmt: skip
    model = ViP2CLIP(checkpoint=runs.ckpt, visualizer=False, precision="fp32")
    expected = f"mask is {IMAGE_SIZE}x{IMAGE_SIZE // 2} but its image {folder / 'defect' / mask.name} is"
    with pytest.raises(BadImageError, match=re.escape(expected)):
        _engine(tmp_path / "engine").test(model, datamodule=module, verbose=False)


def test_few_shot_equals_vip2clip_test_shots(runs: Runs) -> None:
    ours = _class_metrics(runs.ours_few)
    assert abs(runs.few["image_AUROC"] - ours["image_auroc"]) < 1e-3
    assert abs(runs.few["pixel_AUROC"] - ours["pixel_auroc"]) < 1e-3
    assert ours["pixel_auroc"] != _class_metrics(runs.ours)["pixel_auroc"]  # the references changed the maps
    chosen = [Path(p).name for p in runs.ours_few["reference_images"]["texture_0"]]
    assert sorted(chosen) == sorted(runs.few_references) and len(chosen) == SHOTS  # the same references


def test_engine_predict_equals_predictor(runs: Runs) -> None:
    from vip2clip import Predictor, create_model

    predictor = Predictor(create_model(checkpoint=runs.ckpt))
    paths = [path for batch in runs.predictions for path in batch.image_path]
    scored = list(predictor.score(paths, load=load_image))
    maps = torch.cat([batch.anomaly_map.reshape(-1, 96, 96) for batch in runs.predictions]).numpy()
    scores = torch.cat([batch.pred_score for batch in runs.predictions]).numpy()
    assert len(paths) == 8
    np.testing.assert_allclose(maps, np.stack([s.anomaly_map for s in scored]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores, [s.pred_score for s in scored], rtol=0, atol=1e-5)
    labels = torch.cat([batch.pred_label for batch in runs.predictions])
    assert labels.dtype == torch.bool  # thresholded by anomalib's PostProcessor, scores left as probabilities


def test_openvino_export_scores_equal_predictor(runs: Runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes its compile cache to ./openvino_cache

    from vip2clip import Predictor, create_model

    paths = sorted(runs.folder.glob("good/*.png")) + sorted(runs.folder.glob("defect/*.png"))
    expected = [r.pred_score for r in Predictor(create_model(checkpoint=runs.ckpt)).predict(paths)]
    # f32: OpenVINO's CPU plugin runs bf16 by default on CPUs with AMX / AVX-512 BF16 (about 2e-3 apart)
    inferencer = OpenVINOInferencer(path=runs.exported, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    scores = [float(np.asarray(inferencer.predict(path).pred_score).reshape(-1)[0]) for path in paths]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)


def test_data_module_without_masks_skips_pixel_metrics_and_says_how_it_resizes(runs: Runs) -> None:
    assert "image_AUROC" in runs.no_masks and "pixel_AUROC" not in runs.no_masks
    assert any("resize images to [64, 64]" in line and "96 x 96" in line for line in runs.log), runs.log


@pytest.mark.slow
def test_anomalib_cli_runs_the_class_path(runs: Runs, tmp_path: Path) -> None:
    """`anomalib test --model vip2clip.integrations.anomalib.ViP2CLIP ...` as a user types it: the same metrics."""
    command = [str(Path(sys.executable).parent / "anomalib"), "test",
               "--model", "vip2clip.integrations.anomalib.ViP2CLIP", "--model.checkpoint", str(runs.ckpt),
               "--model.precision", "fp32",
               "--data", "Folder", "--data.name", "synthetic", "--data.root", str(runs.folder),
               "--data.normal_dir", "train_good", "--data.normal_test_dir", "good", "--data.abnormal_dir", "defect",
               "--data.mask_dir", "mask", "--data.val_split_mode", "same_as_test", "--data.num_workers", "0",
               "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = dict(re.findall(r"(\w+_(?:AUROC|F1Score))\W+([0-9.]+)", done.stdout + done.stderr))
    assert abs(float(metrics["image_AUROC"]) - runs.zero["image_AUROC"]) < 1e-6
    assert abs(float(metrics["pixel_AUROC"]) - runs.zero["pixel_AUROC"]) < 1e-6


def test_release_resize_of_images_and_masks() -> None:
    from torchvision import tv_tensors

    from vip2clip.integrations.anomalib_processing import ReleaseResize, pil_like_resize

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), dtype=bool)
    mask[10:23, 31:40] = True
    image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    resized_image, resized_mask = ReleaseResize(32)(image, tv_tensors.Mask(torch.from_numpy(mask).to(torch.uint8)))
    expected = np.asarray(resize_image(Image.fromarray(pixels), 32)).transpose(2, 0, 1) / 255
    np.testing.assert_allclose(resized_image.numpy(), expected, atol=1e-7)
    assert torch.equal(resized_mask, preprocess_mask(mask, 32).to(torch.uint8))  # bilinear + 0.5, not nearest
    traced_path = pil_like_resize(image.as_subclass(torch.Tensor)[None], 32)[0].numpy()
    assert np.abs(traced_path - expected).max() <= 1 / 255 + 1e-6


def test_training_is_refused_with_the_vip2clip_command(caplog: pytest.LogCaptureFixture) -> None:
    from vip2clip.integrations.anomalib import ViP2CLIP

    model = ViP2CLIP(backbone="tiny", image_size=64, visualizer=False)
    for step in (model.configure_optimizers, lambda: model.training_step(None)):
        with pytest.raises(RuntimeError, match="vip2clip train --data"):
            step()
    model._trainer = SimpleNamespace(validate_loop=SimpleNamespace(verbose=True))  # as Engine.fit's validation
    with caplog.at_level(logging.WARNING, logger="vip2clip"):
        model.on_validation_start()
    assert "nothing is trained" in caplog.text and "vip2clip train --data" in caplog.text


def test_few_shot_parameters_have_anomalibs_winclip_names(tmp_path: Path) -> None:
    import inspect

    from anomalib import LearningType
    from anomalib.models import WinClip

    from vip2clip.integrations.anomalib import ViP2CLIP

    winclip, ours = inspect.signature(WinClip).parameters, inspect.signature(ViP2CLIP).parameters
    assert {"k_shot", "few_shot_source"} <= set(winclip) & set(ours)
    assert ours["k_shot"].default == winclip["k_shot"].default == 0
    tiny = {"backbone": "tiny", "image_size": 64, "visualizer": False}
    for name in ("part_a.png", "part_b.png", "part_c.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anomalib's names: no warning
        drawn = ViP2CLIP(k_shot=2, few_shot_source=tmp_path, **tiny)
        every = ViP2CLIP(few_shot_source=str(tmp_path), **tiny)
    assert drawn.learning_type == every.learning_type == LearningType.FEW_SHOT
    assert ViP2CLIP(k_shot=0, **tiny).learning_type == LearningType.ZERO_SHOT
    assert len(drawn._source_shots()) == 2 and drawn._source_shots() == drawn._source_shots()  # seeded
    assert sorted(path.name for path in every._source_shots()) == ["part_a.png", "part_b.png", "part_c.png"]
    with pytest.raises(ValueError, match=r"k_shot=4, but few_shot_source .* holds 3 normal image"):
        ViP2CLIP(k_shot=4, few_shot_source=tmp_path, **tiny)._source_shots()


def test_the_old_few_shot_names_still_work_with_a_warning_and_never_beside_the_new() -> None:
    from anomalib import LearningType

    from vip2clip.integrations.anomalib import ViP2CLIP

    tiny = {"backbone": "tiny", "image_size": 64, "visualizer": False}
    with pytest.warns(FutureWarning, match="ViP2CLIP's shots= is now k_shot="):
        assert ViP2CLIP(shots=2, **tiny).k_shot == 2
    with pytest.warns(FutureWarning, match="ViP2CLIP's reference= is now few_shot_source="):
        old = ViP2CLIP(reference="refs", **tiny)
    assert old.few_shot_source == Path("refs") and old.k_shot == 0 and old.learning_type == LearningType.FEW_SHOT
    with pytest.raises(ValueError, match=r"give k_shot \(anomalib's name\) or shots \(its old name\), not both"):
        ViP2CLIP(k_shot=2, shots=2, **tiny)
    with pytest.raises(ValueError, match=r"give few_shot_source \(anomalib's name\) or reference .*, not both"):
        ViP2CLIP(few_shot_source="a", reference="b", **tiny)
    with pytest.raises(ValueError, match="k_shot must be >= 0, got -1"):
        ViP2CLIP(k_shot=-1, **tiny)


def test_missing_or_unsupported_anomalib_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anomalib", None)
    with pytest.raises(ImportError, match=r"vip2clip\[anomalib\]"):
        require_anomalib()
    for version in ("2.6.1", "3.0.0", "1.2"):
        with pytest.raises(ImportError, match=f"supports anomalib {SUPPORTED_RANGE}.*{version}"):
            check_version(version)
    check_version("2.7.0")
    check_version("2.7.1rc1")


def test_export_asks_for_the_opset_it_writes_without_a_failed_conversion(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """anomalib asks torch for opset 14, torch writes 18 and its conversion down to 14 failed with a logged
    traceback (the export succeeding all the same)."""
    import onnx

    from vip2clip.integrations.anomalib import ViP2CLIP

    model = ViP2CLIP(backbone="tiny", image_size=64, visualizer=False, precision="fp32")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        path = model.to_onnx(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    assert onnx.load(path, load_external_data=False).opset_import[0].version == 18
