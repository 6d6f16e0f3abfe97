"""The honest zero-shot protocol: a checkpoint records its training images' SHA-256, `test` and `benchmark` count
the test images among them, `benchmark` refuses an overlapping pair unless --allow-overlap; and `--seeds`."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from vip2clip.cli import main
from vip2clip.data.index import read_index
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.zero_shot import UNKNOWN_NOTE, index_digests, pack_digests, training_digests, unpack_digests
from vip2clip.model.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--top-k", "4", "--no-progress"]
TRAIN_ARGS = ["--epochs", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("zero_shot")
    sizes = {"classes": 1, "image_size": 48, "n_train_good": 0, "n_test_good": 2, "n_test_defect": 3}
    generate_benchmark(base / "a", seed=1, style="textured", **sizes)
    generate_benchmark(base / "b", seed=2, style="structured", **sizes)
    shutil.copytree(base / "a", base / "a_copy")  # the same images under another root
    checkpoint = base / "run" / "checkpoint.pt"
    assert main(["train", "--data", str(base / "a"), "--out", str(checkpoint.parent), *TRAIN_ARGS, *MODEL_ARGS]) == 0
    return {"base": base, "a": base / "a", "b": base / "b", "a_copy": base / "a_copy", "checkpoint": checkpoint}


def test_digests_pack_to_32_bytes_each_and_back() -> None:
    digests = [f"{i:064x}" for i in (3, 1, 2, 1)]
    packed = pack_digests(digests)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert unpack_digests(packed) == set(digests)


def test_the_checkpoint_records_every_training_image(data) -> None:
    meta = load_checkpoint(data["checkpoint"]).meta
    assert training_digests(meta) == set(index_digests(read_index(data["a"]), "test"))
    assert meta["training_images"]["count"] == 5
    assert meta["sources"][0]["images"] == 5


def test_test_reports_training_images_among_the_test_images(data, tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "test",
                "--data",
                str(data["a_copy"]),
                "--checkpoint",
                str(data["checkpoint"]),
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "not zero-shot: 5 of 5 test images were training images" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["zero_shot"] == {"zero_shot": False, "test_images_in_training": 5, "test_images": 5}
    assert "not zero-shot: 5 of 5" in (tmp_path / "results.md").read_text()
    assert (
        main(
            [
                "test",
                "--data",
                str(data["b"]),
                "--checkpoint",
                str(data["checkpoint"]),
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        == 0
    )
    clean = json.loads((tmp_path / "b" / "results.json").read_text())
    assert clean["training"]["zero_shot"]["zero_shot"] is True
    assert not [note for note in clean["notes"] if "zero-shot" in note or "overlap" in note]


def test_an_old_checkpoint_says_overlap_unknown(data, tmp_path: Path, capsys) -> None:
    checkpoint = load_checkpoint(data["checkpoint"])
    del checkpoint.meta["training_images"]
    old = save_checkpoint(tmp_path / "old.pt", checkpoint.config, checkpoint.state, **checkpoint.meta)
    assert (
        main(
            ["test", "--data", str(data["b"]), "--checkpoint", str(old), "--out", str(tmp_path / "t"), "--no-progress"]
        )
        == 0
    )
    assert capsys.readouterr().out.count("overlap unknown") == 1
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert UNKNOWN_NOTE in results["notes"] and results["training"]["zero_shot"]["zero_shot"] is None


@pytest.mark.slow
def test_benchmark_refuses_an_overlapping_pair_unless_allowed(data, tmp_path: Path, capsys) -> None:
    train, copy, b = (f"{name}={data[name]}" for name in ("a", "a_copy", "b"))
    argv = ["benchmark", "--train", train, "--test", b, copy, *TRAIN_ARGS, *MODEL_ARGS]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "a_copy: not zero-shot: 5 of 5 test images were training images" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "train").exists()  # refused before training
    checkpoint_argv = ["benchmark", "--checkpoint", str(data["checkpoint"]), "--test", copy, "--no-progress"]
    assert main([*checkpoint_argv, "--out", str(tmp_path / "ckpt")]) == 2
    assert main([*argv, "--out", str(tmp_path / "allowed"), "--allow-overlap"]) == 0
    combined = json.loads((tmp_path / "allowed" / "benchmark.json").read_text())
    assert combined["training"]["zero_shot"]["a_copy"]["test_images_in_training"] == 5
    assert combined["training"]["zero_shot"]["b"]["zero_shot"] is True
    assert combined["notes"] == ["a_copy: not zero-shot: 5 of 5 test images were training images"]
    assert "not zero-shot" in (tmp_path / "allowed" / "a_copy" / "results.md").read_text()


@pytest.mark.slow
def test_seeds_report_mean_and_standard_deviation(data, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    assert (
        main(
            [
                "benchmark",
                "--train",
                f"a={data['a']}",
                "--test",
                f"b={data['b']}",
                "--seeds",
                "1",
                "2",
                "--out",
                str(out),
                *TRAIN_ARGS,
                *MODEL_ARGS,
            ]
        )
        == 0
    )
    per_seed = [json.loads((out / f"seed-{seed}" / "benchmark.json").read_text()) for seed in (1, 2)]
    assert [run["training"]["config"]["seed"] for run in per_seed] == [1, 2]
    combined = json.loads((out / "benchmark.json").read_text())
    cell = combined["datasets"][0]["metrics"]["image_auroc"]
    values = [run["datasets"][0]["mean"]["image_auroc"] for run in per_seed]
    assert math.isclose(cell["mean"], statistics.fmean(values)) and math.isclose(cell["std"], statistics.stdev(values))
    assert "±" in (out / "benchmark.md").read_text()
    assert len(list((out / "feature_cache").iterdir())) >= 1  # the seeds share one feature cache
    assert (
        main(
            [
                "benchmark",
                "--checkpoint",
                str(data["checkpoint"]),
                "--test",
                f"b={data['b']}",
                "--seeds",
                "1",
                "2",
                "--out",
                str(tmp_path / "x"),
                *MODEL_ARGS,
            ]
        )
        == 2
    )
