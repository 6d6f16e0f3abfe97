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
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.index import read_index
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.zero_shot import (
    BYTES,
    BYTES_NOTE,
    UNKNOWN_NOTE,
    index_digests,
    pack_digests,
    training_digests,
    unpack_digests,
)
from vip2clip.model.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--top-k", "4", "--no-progress"]
TRAIN_ARGS = ["--epochs", "1", "--train-batch-size", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("zero_shot")
    sizes = {"classes": 1, "image_size": 48, "n_train_good": 0, "n_test_good": 2, "n_test_defect": 3}
    generate_benchmark(base / "a", seed=1, style="textured", **sizes)
    generate_benchmark(base / "b", seed=2, style="structured", **sizes)
    shutil.copytree(base / "a", base / "a_copy")  # the same images under another root
    _resave(base / "a", base / "a_resaved", "png")  # the same pixels in other bytes
    _resave(base / "a", base / "a_jpeg", "jpeg")  # near-duplicates: not caught, and documented so
    checkpoint = base / "run" / "checkpoint.pt"
    assert main(["train", "--data", str(base / "a"), "--out", str(checkpoint.parent), *TRAIN_ARGS, *MODEL_ARGS]) == 0
    folders = {name: base / name for name in ("a", "b", "a_copy", "a_resaved", "a_jpeg")}
    return {"base": base, **folders, "checkpoint": checkpoint}


def _resave(source: Path, target: Path, how: str) -> None:
    """A copy of a dataset whose images are re-saved: losslessly as PNG (other bytes) or as JPEG (other pixels)."""
    shutil.copytree(source, target)
    for path in target.rglob("*.png"):
        if "ground_truth" not in path.parts:
            with Image.open(path) as image:
                image.load()
            image.save(path, format=how, **({"compress_level": 0} if how == "png" else {"quality": 95}))
            if how == "png":
                assert path.read_bytes() != (source / path.relative_to(target)).read_bytes()


def test_digests_pack_to_32_bytes_each_and_back() -> None:
    digests = [f"{i:064x}" for i in (3, 1, 2, 1)]
    packed = pack_digests(digests)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 32)
    assert unpack_digests(packed) == set(digests)


def test_the_checkpoint_records_every_training_image(data) -> None:
    meta = load_checkpoint(data["checkpoint"]).meta
    assert training_digests(meta).digests == set(index_digests(read_index(data["a"]), "test"))
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
    overlap = results["training"]["zero_shot"]
    assert {key: overlap[key] for key in ("zero_shot", "test_images_in_training", "test_images")} == {
        "zero_shot": False,
        "test_images_in_training": 5,
        "test_images": 5,
    }
    assert "near-duplicates (PNG -> JPEG, resized) are not" in overlap["compared"]
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
    old = save_checkpoint(tmp_path / "old.pt", checkpoint.config, state=checkpoint.state, **checkpoint.meta)
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


def _test(data, root: Path, checkpoint: Path, out: Path) -> dict:
    assert main(["test", "--data", str(root), "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text())["training"]["zero_shot"]


def test_a_losslessly_resaved_copy_is_a_training_image(data, tmp_path: Path, capsys) -> None:
    """Issue 27 bad item 1: digests were of the file bytes, so re-saved PNGs passed as zero-shot."""
    resaved = _test(data, data["a_resaved"], data["checkpoint"], tmp_path / "t")
    assert resaved["zero_shot"] is False and resaved["test_images_in_training"] == 5
    train, test = f"a={data['a']}", f"resaved={data['a_resaved']}"
    argv = ["benchmark", "--train", train, "--test", test, "--out", str(tmp_path / "b"), *TRAIN_ARGS, *MODEL_ARGS]
    assert main(argv) == 2
    assert "resaved: not zero-shot: 5 of 5 test images were training images" in capsys.readouterr().err
    assert not (tmp_path / "b" / "train").exists()  # refused before training


def test_a_jpeg_near_duplicate_is_not_caught_as_documented(data, tmp_path: Path) -> None:
    jpeg = _test(data, data["a_jpeg"], data["checkpoint"], tmp_path)
    assert jpeg["zero_shot"] is True and "re-encoded near-duplicates" in jpeg["compared"]


def test_training_without_the_cache_records_the_same_pixel_digests(data, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", str(data["a"]), "--out", str(out), "--no-cache", *TRAIN_ARGS, *MODEL_ARGS]
    assert main(argv) == 0
    record = training_digests(load_checkpoint(out / "checkpoint.pt").meta)
    assert record.digests == training_digests(load_checkpoint(data["checkpoint"]).meta).digests
    assert record.digests == set(index_digests(read_index(data["a_resaved"]), "test"))


def _with_record(data, path: Path, **changes) -> Path:
    checkpoint = load_checkpoint(data["checkpoint"])
    checkpoint.meta["training_images"].update(changes)
    return save_checkpoint(path, checkpoint.config, state=checkpoint.state, **checkpoint.meta)


def test_an_older_checkpoint_with_file_digests_finds_byte_copies_only(data, tmp_path: Path, capsys) -> None:
    """A checkpoint of an older vip2clip recorded file digests: byte copies are still found; no byte copy is not
    zero-shot but unknown (a re-saved copy cannot be ruled out), said so."""
    files = pack_digests(index_digests(read_index(data["a"]), "test", hashed=BYTES))
    old = _with_record(data, tmp_path / "old.pt", sha256=files, hash=BYTES)
    assert _test(data, data["a_copy"], old, tmp_path / "copy")["test_images_in_training"] == 5
    resaved = _test(data, data["a_resaved"], old, tmp_path / "resaved")
    assert resaved["zero_shot"] is None and resaved["test_images_in_training"] == 0
    assert BYTES_NOTE in capsys.readouterr().out
    assert BYTES_NOTE in json.loads((tmp_path / "resaved" / "results.json").read_text())["notes"]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"sha256": torch.zeros((0, 32), dtype=torch.uint8), "count": 0}, "shape [0, 32]"),
        ({"sha256": torch.zeros((5, 31), dtype=torch.uint8)}, "shape [5, 31]"),
        ({"sha256": torch.zeros(160, dtype=torch.uint8)}, "not a uint8 [N, 32] tensor"),
        ({"count": 7}, "counts 7 images but holds 5"),
        ({"hash": "md5"}, "unknown kind"),
    ],
)
def test_a_damaged_record_is_refused(data, tmp_path: Path, capsys, changes: dict, problem: str) -> None:
    """Issue 27 minor: digests of the wrong shape or none at all read as zero-shot."""
    damaged = _with_record(data, tmp_path / "damaged.pt", **changes)
    argv = ["test", "--data", str(data["b"]), "--checkpoint", str(damaged), "--out", str(tmp_path / "t")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "damaged.pt: the checkpoint's record of its training images is damaged" in err and problem in err


def test_a_listed_but_missing_test_image_is_skipped_or_refused_before_training(data, tmp_path, capsys) -> None:
    """Issue 27 minor: the guard hashed every listed file, so --skip-bad stopped at a missing one."""
    damaged = tmp_path / "damaged"
    shutil.copytree(data["b"], damaged)
    missing = read_index(damaged).resolve(read_index(damaged).samples("test")[0].img_path)
    Path(missing).unlink()
    argv = ["test", "--data", str(damaged), "--checkpoint", str(data["checkpoint"]), "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "t"), "--skip-bad"]) == 0
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    benchmark = ["benchmark", "--train", f"a={data['a']}", "--test", f"d={damaged}", *TRAIN_ARGS, *MODEL_ARGS]
    assert main([*benchmark, "--out", str(tmp_path / "b")]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err and not (tmp_path / "b" / "train").exists()


def test_a_test_dataset_named_twice_is_refused_before_training(data, tmp_path: Path, capsys) -> None:
    """Issue 27 minor: `--test c=C c=C` was refused only after training."""
    out = tmp_path / "out"
    test = f"c={data['b']}"
    assert main(["benchmark", "--train", f"a={data['a']}", "--test", test, test, "--out", str(out), *MODEL_ARGS]) == 2
    assert "two test datasets share the output folder 'c'" in capsys.readouterr().err
    assert not (out / "train").exists()
