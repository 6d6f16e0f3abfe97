"""Reference images (few-shot): nearest-neighbour search, fusion, the on-disk memory cache, `--reference`,
`--shots` and their errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vip2clip
from vip2clip.cli import main
from vip2clip.config import ModelConfig
from vip2clip.data.images import BadImageError
from vip2clip.inference.predictor import Predictor
from vip2clip.model import utpa
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.identity import ModelIdentity
from vip2clip.outputs import ImageBatch
from vip2clip.scoring.references import (
    FusionRule,
    ReferenceEngine,
    ReferenceMemory,
    load_references,
    memory_from_files,
    nearest_distance,
)
from vip2clip.scoring.tiling import TileConfig, tile_boxes

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("references") / "checkpoint.pt"
    return save_checkpoint(path, tiny_model.config, state=tiny_model.trainable_state_dict())


def _save_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        paths.append(folder / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_chunked_nearest_neighbour_search_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(3, 20, 16, generator=generator), dim=-1)
    memory = torch.nn.functional.normalize(torch.randn(101, 16, generator=generator), dim=-1)
    expected = (1 - torch.einsum("bqd,md->bqm", queries, memory).amax(dim=-1)).clamp(0, 1)
    for budget in (1, 7, 60 * 37, 1 << 24):  # from one similarity at a time to everything at once
        actual = nearest_distance(queries, memory.half(), budget=budget)
        torch.testing.assert_close(actual, expected, atol=2e-3, rtol=0)  # the memory is float16
    assert nearest_distance(memory[None, :5], memory).abs().max() < 1e-6  # a patch in the memory: distance 0


def test_fusion_rule(tiny_model, tmp_path: Path) -> None:
    paths = _save_images(tmp_path / "refs", 2, (64, 64))
    identity = ModelIdentity.of(tiny_model)
    rule = FusionRule(weight=0.75)
    memory = memory_from_files(tiny_model, identity, paths=paths, rule=rule)
    assert memory.n_patches == 2 * 16 and all(t.dtype == torch.float16 for t in memory.tokens)
    images = torch.stack([vip2clip.preprocess(Image.open(p), 64) for p in paths])
    fused = ReferenceEngine(tiny_model, memory).predict(images)
    plain = tiny_model.predict(images, return_features=True)
    distance = torch.stack(
        [nearest_distance(t, m) for t, m in zip(plain.features.patch_tokens, memory.tokens, strict=True)]
    ).mean(dim=0)
    reference_map = utpa.smooth_map(distance, grid=plain.features.grid, size=(64, 64), sigma=tiny_model.config.sigma)
    torch.testing.assert_close(fused.anomaly_map, 0.25 * plain.anomaly_map + 0.75 * reference_map)
    torch.testing.assert_close(fused.pred_score, 0.25 * plain.pred_score + 0.75 * reference_map.flatten(1).amax(1))
    assert distance.max() < 2e-3  # the references themselves are normal: (float16) distance ~0
    with pytest.raises(ValueError, match="weight must be in"):
        FusionRule(weight=0)


def test_the_memory_is_cached_on_disk_and_rebuilt_when_a_file_changes(tiny_model, tmp_path: Path, caplog) -> None:
    paths = _save_images(tmp_path / "refs", 2, (80, 60))
    identity, cache = ModelIdentity.of(tiny_model), tmp_path / "cache"
    calls = []

    class Counting:
        config = tiny_model.config

        def predict(self, images: torch.Tensor, return_features: bool = False) -> ImageBatch:
            calls.append(images.shape[0])
            return tiny_model.predict(images, return_features=return_features)

    def load(tiling: TileConfig | None = None) -> ReferenceMemory:
        return load_references(Counting(), identity, folder=tmp_path / "refs", tiling=tiling, cache_dir=cache)

    first = load()
    stored = sorted(cache.glob("*.npy"))
    assert len(stored) == 1 and np.load(stored[0]).dtype == np.float16 and calls == [2]
    assert np.load(stored[0]).shape == (len(first.tokens), 2 * 16, first.tokens[0].shape[1])
    again = load()
    assert calls == [2]  # read, not recomputed
    assert all(torch.equal(a, b) for a, b in zip(first.tokens, again.tokens, strict=True))
    Image.new("RGB", (80, 60), (9, 9, 9)).save(paths[1])  # other content: another key
    load()
    assert calls == [2, 2] and len(list(cache.glob("*.npy"))) == 2
    tiled = load(TileConfig(40, 0.0))
    assert tiled.n_patches == 2 * len(tile_boxes((80, 60), TileConfig(40, 0.0))) * 16  # tiles are references too
    for path in cache.glob("*.npy"):
        path.write_bytes(b"not an array")
    with caplog.at_level(logging.WARNING):
        rebuilt = load()
    assert "unreadable" in caplog.text and rebuilt.n_patches == 32


def test_references_of_another_size_than_the_test_images(tiny_model, tmp_path: Path) -> None:
    _save_images(tmp_path / "refs", 3, (300, 170))  # preprocessed to the model's input like any test image
    memory = load_references(tiny_model, ModelIdentity.of(tiny_model), folder=tmp_path / "refs")
    predictor = Predictor(tiny_model, references=memory)
    results = predictor.predict([np.zeros((40, 50, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)])
    assert [r.anomaly_map.shape for r in results] == [(40, 50), (64, 64)]
    record = predictor.identity.references
    assert record["rule"] == FusionRule().to_dict() and len(record["images"]) == 3


def test_reference_folder_errors(tiny_model, tmp_path: Path) -> None:
    identity = ModelIdentity.of(tiny_model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for folder, message in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "notes.txt", "not a folder"),
        (tmp_path / "empty", "holds no images"),
    ):
        with pytest.raises(ValueError, match=message) as caught:
            load_references(tiny_model, identity, folder=folder)
        assert str(folder) in str(caught.value)
    _save_images(tmp_path / "broken", 1, (32, 32))
    (tmp_path / "broken" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BadImageError, match=r"cut\.png"):
        load_references(tiny_model, identity, folder=tmp_path / "broken")


def test_an_unreadable_reference_folder(tiny_model, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    _save_images(locked, 1, (32, 32))
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user who can read any folder (root)")
        with pytest.raises(ValueError, match="cannot be read"):
            load_references(tiny_model, ModelIdentity.of(tiny_model), folder=locked)
    finally:
        locked.chmod(0o755)


def test_an_engine_without_patch_tokens_is_refused(tiny_model) -> None:
    class NoFeatures:  # e.g. an exported graph that outputs scores and maps only
        config = ModelConfig(backbone="tiny", image_size=64)

        def predict(self, images: torch.Tensor) -> ImageBatch:
            raise AssertionError("not to be called")

    memory = ReferenceMemory(tokens=tuple(torch.zeros(4, 8, dtype=torch.float16) for _ in range(4)), files=())
    with pytest.raises(ValueError, match=r"need the encoder's patch tokens, which this inference engine \(NoFeatures"):
        ReferenceEngine(NoFeatures(), memory)


def test_predict_with_a_reference_folder(checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _save_images(tmp_path / "good", 2, (90, 70), seed=1)
    _save_images(tmp_path / "parts", 2, (60, 60), seed=2)
    args = [str(tmp_path / "parts"), "--checkpoint", str(checkpoint), *MODEL_ARGS]
    out = tmp_path / "out"
    assert main(["predict", *args, "--reference", str(tmp_path / "good"), "--out", str(out)]) == 0
    assert len(list((tmp_path / "xdg/vip2clip/references").glob("*.npy"))) == 1  # the default cache
    settings = json.loads((out / "predictions.json").read_text())["settings"]
    assert settings["model"]["references"]["rule"]["weight"] == FusionRule().weight
    # Other references for the same folder are other settings: refused, as a changed threshold is.
    Image.new("RGB", (90, 70)).save(tmp_path / "good" / "0.png")
    capsys.readouterr()
    assert main(["predict", *args, "--reference", str(tmp_path / "good"), "--out", str(out)]) == 2
    assert "references_sha256 differ" in capsys.readouterr().err
    assert main(["predict", *args, "--reference", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "reference folder" in error and "does not exist" in error
    assert main(["calibrate", str(tmp_path / "good"), "--reference", str(tmp_path / "good"), "--out",
                 str(tmp_path / "c.json"), "--checkpoint", str(checkpoint), *MODEL_ARGS]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["predict", *args, "--calibration", str(tmp_path / "c.json"), "--out", str(tmp_path / "o2")]) == 2
    assert "reference images: calibrated with weight 0.75" in capsys.readouterr().err


def test_serve_and_the_python_api_take_tiles_and_references(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from vip2clip.cli import build_parser
    from vip2clip.cli.predict import build_predictor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _save_images(tmp_path / "good", 2, (50, 40))
    model = ["--checkpoint", str(checkpoint), "--backbone", "tiny", "--image-size", "64"]
    options = ["--tile", "32", "--tile-overlap", "0.5", "--reference", str(tmp_path / "good")]
    argv = ["serve", *model, *options, "--reference-cache", str(tmp_path / "c")]
    served = build_predictor(build_parser().parse_args(argv))
    assert served.tiling == TileConfig(32, 0.5) and len(served.references.files) == 2
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
    python = Predictor.from_checkpoint(
        checkpoint, backbone="tiny", image_size=64, tiling=TileConfig(32, 0.5), reference=tmp_path / "good"
    )
    assert len(list((tmp_path / "xdg/vip2clip/references").glob("*.npy"))) == 1  # the default cache
    image = np.random.default_rng(5).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    a, b = served.predict(image)[0], python.predict(image)[0]
    assert a.pred_score == pytest.approx(b.pred_score) and np.allclose(a.anomaly_map, b.anomaly_map)
    assert python.identity.tiling == {"size": 32, "overlap": 0.5} and python.identity.references is not None
