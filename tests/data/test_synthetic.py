"""The seeded synthetic benchmark: layout, index, determinism and the 'defects are consistently brighter' rule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from vip2clip.data.images import load_image, load_mask
from vip2clip.data.index import read_index
from vip2clip.data.synthetic import DEFECT_KINDS, generate_benchmark


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}


def test_layout_and_index(tmp_path: Path) -> None:
    index = generate_benchmark(
        tmp_path, classes=2, seed=3, image_size=48, n_train_good=2, n_test_good=3, n_test_defect=5
    )
    assert read_index(tmp_path).splits == index.splits
    assert index.classes() == ["texture_0", "texture_1"] == index.classes("train")
    for counts in index.counts("test"):
        assert (counts.normal, counts.anomalous, counts.masks) == (3, 5, 5)
    for counts in index.counts("train"):
        assert (counts.normal, counts.anomalous) == (2, 0)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "texture_0").rglob("*.png"))
    assert names == sorted(
        [f"texture_0/train/good/{i:03d}.png" for i in range(2)]
        + [f"texture_0/test/good/{i:03d}.png" for i in range(3)]
        + ["texture_0/test/scratch/000.png", "texture_0/test/scratch/001.png"]
        + [f"texture_0/test/{kind}/000.png" for kind in DEFECT_KINDS[1:]]
        + ["texture_0/ground_truth/scratch/000_mask.png", "texture_0/ground_truth/scratch/001_mask.png"]
        + [f"texture_0/ground_truth/{kind}/000_mask.png" for kind in DEFECT_KINDS[1:]]
    )
    for sample in index.samples("test"):
        assert sample.specie_name == ("good" if not sample.anomaly else sample.img_path.split("/")[2])


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"classes": 1, "image_size": 32, "n_train_good": 1, "n_test_good": 1, "n_test_defect": 2}
    generate_benchmark(tmp_path / "a", seed=5, **kwargs)
    generate_benchmark(tmp_path / "b", seed=5, **kwargs)
    generate_benchmark(tmp_path / "c", seed=6, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    digest_a, digest_c = _digest(tmp_path / "a"), _digest(tmp_path / "c")
    assert digest_a.keys() == digest_c.keys()
    assert all(digest_a[k] != digest_c[k] for k in digest_a if k.endswith("000.png"))


def test_more_images_do_not_change_existing_ones(tmp_path: Path) -> None:
    generate_benchmark(tmp_path / "a", classes=1, image_size=32, n_train_good=1, n_test_good=1, n_test_defect=1)
    generate_benchmark(tmp_path / "b", classes=1, image_size=32, n_train_good=3, n_test_good=2, n_test_defect=4)
    small, large = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert all(large[name] == digest for name, digest in small.items() if name != "meta.json")


@pytest.mark.parametrize("style", ["textured", "structured"])
def test_defects_are_brighter_everywhere_and_masks_match(tmp_path: Path, style: str) -> None:
    index = generate_benchmark(tmp_path, classes=3, seed=1, image_size=64, n_test_good=2, n_test_defect=8, style=style)
    for sample in index.samples("test") + index.samples("train"):
        pixels = np.asarray(load_image(index.resolve(sample.img_path))).astype(int)
        assert pixels.shape == (64, 64, 3)
        if not sample.anomaly:
            assert pixels.max() <= round(0.6 * 255)
            continue
        mask = load_mask(index.resolve(sample.mask_path))
        assert mask.mean() >= 0.015, f"{sample.img_path}: defect too small to cover a few patches"
        # Every channel of every defect pixel is above every channel of every normal pixel.
        assert pixels[mask].min() >= round(0.65 * 255)
        assert pixels[~mask].max() <= round(0.6 * 255)


def test_structured_and_textured_differ(tmp_path: Path) -> None:
    kwargs = {"classes": 1, "image_size": 32, "n_train_good": 1, "n_test_good": 0, "n_test_defect": 0}
    textured = generate_benchmark(tmp_path / "t", style="textured", **kwargs)
    structured = generate_benchmark(tmp_path / "s", style="structured", **kwargs)
    assert structured.classes("train") == ["object_0"]
    assert textured.classes("train") == ["texture_0"]


def test_bad_arguments_and_unrelated_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic style 'noisy'"):
        generate_benchmark(tmp_path / "x", style="noisy")
    with pytest.raises(ValueError, match="classes must be >= 1"):
        generate_benchmark(tmp_path / "x", classes=0)
    with pytest.raises(ValueError, match="n_test_defect must be >= 0"):
        generate_benchmark(tmp_path / "x", n_test_defect=-1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_benchmark(tmp_path / "busy", classes=1, image_size=32)


def test_regenerating_over_an_earlier_benchmark_is_allowed(tmp_path: Path) -> None:
    first = generate_benchmark(tmp_path, classes=1, image_size=32, n_train_good=1, n_test_good=1, n_test_defect=1)
    second = generate_benchmark(tmp_path, classes=1, image_size=32, n_train_good=1, n_test_good=1, n_test_defect=1)
    assert first.splits == second.splits


def test_synth_cli_matches_the_function(tmp_path: Path, capsys) -> None:
    from vip2clip.cli import main

    argv = ["synth", "--out", str(tmp_path / "cli"), "--classes", "2", "--seed", "4", "--image-size", "32"]
    code = main([*argv, "--style", "structured", "--train-good", "1", "--test-good", "1", "--test-defect", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "object_1: 1 normal, 2 anomalous, 2 masks" in out.splitlines()
    assert out.splitlines()[-1] == "total: 2 normal, 4 anomalous, 4 masks"
    kwargs = {"n_train_good": 1, "n_test_good": 1, "n_test_defect": 2, "style": "structured"}
    generate_benchmark(tmp_path / "api", classes=2, seed=4, image_size=32, **kwargs)
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "api")
    assert main(["synth", "--out", str(tmp_path / "bad"), "--classes", "0"]) == 2
    assert "classes must be >= 1" in capsys.readouterr().err
