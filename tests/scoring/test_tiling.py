"""Tiling: the tile grid, seamless blending, tiled Predictor / predict / calibrate / test, and bounded memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vip2clip.cli import main
from vip2clip.config import OPENAI_MEAN, OPENAI_STD, ModelConfig
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.inference import calibration as calib
from vip2clip.inference.predictor import Predictor
from vip2clip.inference.thresholds import Thresholds
from vip2clip.outputs import ImageBatch
from vip2clip.scoring.tiling import StitchedMap, TileConfig, axis_starts, tile_boxes

MODEL_ARGS = ["--backbone", "tiny", "--no-progress"]
# Untrained tiny maps are nearly flat: AUPRO may be undefined (NaN) in the tiled `test` runs.
pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")


class ConstantEngine:
    """Every tile's map is `value` everywhere; records the batch sizes it was called with."""

    def __init__(self, value: float, image_size: int = 32) -> None:
        self.config = ModelConfig(backbone="tiny", image_size=image_size)
        self.value = value
        self.batches: list[int] = []

    def predict(self, images: torch.Tensor) -> ImageBatch:
        self.batches.append(images.shape[0])
        size = self.config.image_size
        return ImageBatch(torch.full((images.shape[0],), 0.25), torch.full((images.shape[0], size, size), self.value))


class EchoEngine(ConstantEngine):
    """The map of a tile is its own grey level in [0, 1] (the input de-normalised), the score its mean."""

    def predict(self, images: np.ndarray) -> ImageBatch:
        mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        grey = (torch.as_tensor(images) * std + mean).mean(dim=1)  # the Predictor passes float32 numpy arrays
        return ImageBatch(grey.flatten(1).mean(dim=1), grey)


@pytest.mark.parametrize(
    ("length", "size", "overlap"), [(512, 128, 0.0), (500, 128, 0.25), (1000, 300, 0.5), (129, 128, 0.25)]
)
def test_grid_covers_the_image_with_full_tiles_and_the_last_at_the_border(length, size, overlap) -> None:
    starts = axis_starts(length, size=size, overlap=overlap)
    assert starts[0] == 0 and starts[-1] == length - size
    steps = np.diff(starts)
    assert (steps > 0).all() and (size - steps >= round(overlap * size) - 1).all()  # overlap at least the nominal
    assert len(starts) == 1 or len(starts) == int(np.ceil((length - size) / (size * (1 - overlap)) - 1e-9)) + 1
    assert axis_starts(512, size=128, overlap=0.0) == [0, 128, 256, 384]
    # Tiles are never smaller than SIZE unless the image is: then one tile spans that side.
    assert tile_boxes((100, 300), TileConfig(128, 0.25)) == [(0, 0, 100, 128), (0, 86, 100, 214), (0, 172, 100, 300)]


def test_overlap_blending_is_a_linear_cross_fade() -> None:
    # Two 32-pixel tiles on a 48-pixel row overlap by 16: each weight ramps over the overlap, tile A = 0, B = 1.
    stitched = StitchedMap((48, 1), TileConfig(32, 0.5))
    assert stitched.boxes == [(0, 0, 32, 1), (16, 0, 48, 1)]
    stitched.add(0, np.zeros((1, 32), np.float32), score=0.2)
    stitched.add(1, np.ones((1, 32), np.float32), score=0.7)
    score, row = stitched.finish()
    expected = [0] * 16 + [(j + 0.5) / 16 for j in range(16)] + [1] * 16  # 0.03125, 0.09375 ... 0.96875
    np.testing.assert_allclose(row[0], expected, atol=1e-6)
    assert score == 0.7  # the image score is the maximum tile score
    incomplete = StitchedMap((48, 1), TileConfig(32, 0.5))
    incomplete.add(0, np.zeros((1, 32), np.float32), score=0.2)
    with pytest.raises(ValueError, match="1 of 2 tiles were not scored"):
        incomplete.finish()


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_a_constant_model_gives_a_constant_map_without_seams(overlap: float) -> None:
    engine = ConstantEngine(0.375)
    predictor = Predictor(engine, Thresholds(0.5, 0.5, "t"), batch_size=5, tiling=TileConfig(40, overlap))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8))
    result = predictor.predict(image)[0]
    assert result.anomaly_map.shape == (97, 131) and result.anomaly_map.dtype == np.float32
    np.testing.assert_allclose(result.anomaly_map, 0.375, rtol=0, atol=1e-6)
    assert result.pred_score == 0.25
    n_tiles = len(tile_boxes((131, 97), TileConfig(40, overlap)))
    assert sum(engine.batches) == n_tiles and max(engine.batches) == 5  # tiles share batches of batch_size


def test_stitching_reconstructs_a_smooth_image() -> None:
    # Each tile's map is its own grey level, so a correct blend gives back the image (up to resizing at tile edges).
    ramp = np.linspace(0.1, 0.9, 300, dtype=np.float32)
    grey = np.add.outer(np.linspace(0, 0.05, 200), ramp)
    image = Image.fromarray(np.rint(np.repeat(grey[..., None], 3, axis=2) * 255).astype(np.uint8))
    for overlap in (0.25, 0.5):
        engine = EchoEngine(0.0, image_size=64)
        result = Predictor(engine, batch_size=4, tiling=TileConfig(64, overlap)).predict(image)[0]
        error = np.abs(result.anomaly_map - grey)
        assert error[4:-4, 4:-4].max() < 0.01, overlap  # no seam, no misplaced tile
        assert np.abs(np.diff(result.anomaly_map, n=2, axis=1))[4:-4, 4:-4].max() < 0.01


def test_an_image_within_one_tile_scores_as_without_tiling(tiny_model) -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    plain = Predictor(tiny_model).predict(image)[0]
    tiled = Predictor(tiny_model, tiling=TileConfig(128)).predict(image)[0]
    assert tiled.pred_score == pytest.approx(plain.pred_score, abs=1e-6)
    np.testing.assert_allclose(tiled.anomaly_map, plain.anomaly_map, atol=1e-6)
    assert Predictor(tiny_model, tiling=TileConfig(128)).identity.tiling == {"size": 128, "overlap": 0.25}


def _peak_rss_above(call) -> float | None:
    """Peak resident memory (MiB) of `call` above the resident memory before it, None where Linux' counters are
    missing."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        before = int(re.search(r"VmRSS:\s+(\d+)", status.read_text()).group(1))
    except (OSError, AttributeError):
        call()
        return None
    call()
    return (int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) - before) / 1024


@pytest.mark.slow
def test_a_20_megapixel_image_stays_within_the_memory_bound(tiny_model) -> None:
    width, height = 5472, 3648  # 20.0 MP, a 20 MP industrial camera's frame
    pixels = width * height
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    predictor = Predictor(tiny_model, Thresholds(0.5, 0.5, "t"), batch_size=8, tiling=TileConfig(1024))
    predictor.predict(Image.new("RGB", (64, 64)))  # first-call allocations are not the image's
    results = []
    tracemalloc.start()
    rss = _peak_rss_above(lambda: results.append(predictor.predict(image)[0]))
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert results[0].anomaly_map.shape == (height, width) and results[0].anomaly_map.dtype == np.float32
    # The stated bound (docs/tiling.md): numpy holds the float32 accumulator that becomes the map and the bool mask
    # (5 bytes per pixel) plus tile-sized temporaries; the process grows by at most that, the RGB copy that the
    # decoding makes (3 bytes per pixel) and 64 MiB. Keeping every tile map, or float64 sums, breaks it.
    assert numpy_peak < 5 * pixels + 16 * 2**20
    if rss is not None:
        assert rss < (9 * pixels) / 2**20 + 64, f"{rss:.0f} MiB"


def _mosaic(root: Path) -> tuple[Image.Image, int]:
    """A 512x512 mosaic of sixteen 128-px synthetic parts ('structured', the demo's test style), one defective (a
    blob); returns it and the defective part's position (row-major)."""
    index = generate_benchmark(root, classes=1, seed=7, style="structured", n_train_good=0, n_test_good=15,
                               n_test_defect=2)  # fmt: skip
    good = [s for s in index.samples("test") if not s.anomaly]
    blob = next(s for s in index.samples("test") if s.specie_name == "blob")
    position = 9
    parts = [*good[:position], blob, *good[position:]]
    mosaic = Image.new("RGB", (512, 512))
    for k, sample in enumerate(parts):
        mosaic.paste(Image.open(index.resolve(sample.img_path)).convert("RGB"), ((k % 4) * 128, (k // 4) * 128))
    return mosaic, position


@pytest.mark.slow
def test_predict_tiles_a_mosaic_and_the_raw_map_peaks_on_the_defective_part(demo_checkpoint, tmp_path: Path) -> None:
    mosaic, position = _mosaic(tmp_path / "parts")
    mosaic.save(tmp_path / "mosaic.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vip2clip", "predict", str(tmp_path / "mosaic.png"), "--checkpoint",
               str(demo_checkpoint), "--tile", "128", "--tile-overlap", "0", "--raw-maps", "--out", str(out),
               *MODEL_ARGS]  # fmt: skip
    process = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    row = json.loads((out / "predictions.json").read_text())["predictions"][0]
    raw = np.load(out / row["anomaly_map"])
    assert row["anomaly_map"] == "maps/mosaic_png.npy" and raw.shape == (512, 512) and raw.dtype == np.float16
    y, x = np.unravel_index(int(np.argmax(raw)), raw.shape)
    assert (y // 128) * 4 + x // 128 == position
    settings = json.loads((out / "predictions.json").read_text())["settings"]
    assert settings["model"]["tiling"] == {"size": 128, "overlap": 0.0}


def test_tiled_calibration_is_refused_without_tiling(checkpoint_64: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 120, (90, 150, 3), dtype=np.uint8)).save(good / f"{k}.png")
    args = ["--checkpoint", str(checkpoint_64), "--image-size", "64", *MODEL_ARGS]
    assert main(["calibrate", str(good), "--out", str(tmp_path / "c.json"), "--tile", "64", *args]) == 0
    loaded = calib.load(tmp_path / "c.json")
    assert loaded.identity.tiling == {"size": 64, "overlap": 0.25} and loaded.n_images == 3
    # The pixel quantile is taken over the stitched maps at the images' own size, the maps predict thresholds.
    model_args = {"backbone": "tiny", "image_size": 64}
    predictor = Predictor.from_checkpoint(checkpoint_64, tiling=TileConfig(64), **model_args)
    maps = [r.anomaly_map for r in predictor.predict(sorted(good.glob("*.png")))]
    assert loaded.pixel_threshold == pytest.approx(np.quantile(np.concatenate([m.ravel() for m in maps]), 0.999))
    capsys.readouterr()
    target = [str(good / "0.png"), "--calibration", str(tmp_path / "c.json"), *args]
    assert main(["predict", *target, "--out", str(tmp_path / "p")]) == 2
    assert "tiling: calibrated with size 64, overlap 0.25, model uses none" in capsys.readouterr().err
    assert main(["predict", *target, "--tile", "64", "--out", str(tmp_path / "p")]) == 0
    assert main(["predict", *target, "--tile", "64", "--tile-overlap", "1.5", "--out", str(tmp_path / "p")]) == 2
    assert "tile overlap must be in [0, 0.9]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint_64(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    from vip2clip.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("tiling") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, state=tiny_model.trainable_state_dict())


def test_tiled_test_equals_plain_test_when_a_tile_is_the_image(checkpoint_64: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_benchmark(data, classes=1, seed=3, image_size=64, n_train_good=0, n_test_good=3, n_test_defect=3)
    args = ["test", "--data", str(data), "--checkpoint", str(checkpoint_64), "--image-size", "64", *MODEL_ARGS]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "whole"), "--tile", "64"]) == 0
    assert main([*args, "--out", str(tmp_path / "tiled"), "--tile", "40", "--batch-size", "3"]) == 0
    plain, whole, tiled = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("plain", "whole", "tiled"))
    for key, value in plain["mean"].items():
        assert whole["mean"][key] == pytest.approx(value, abs=1e-6), key  # same maps through the tiled path
    assert tiled["protocol"]["tiling"]["size"] == 40 and "resized" in tiled["protocol"]["tiling"]["maps"]
    assert tiled["model"]["tiling"] == {"size": 40, "overlap": 0.25} and tiled["n_images"] == 6
    assert plain["protocol"]["tiling"] is None
