"""`vip2clip test/benchmark --shots K`: the few-shot protocol (K normal train images per class as references)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.class_scoring import choose_shots

MODEL_ARGS = ["--backbone", "tiny", "--no-progress"]


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh 'structured' set (the demo's test style, another seed) with 8 normal train images per class."""
    root = tmp_path_factory.mktemp("fewshot") / "structured"
    generate_benchmark(root, classes=2, seed=112, style="structured", n_train_good=8, n_test_good=8, n_test_defect=8)
    return root


def test_shots_are_seeded_per_class(unseen: Path) -> None:
    from vip2clip.data.index import read_index

    index = read_index(unseen)
    both = choose_shots(index, ["object_0", "object_1"], shots=3, seed=5)
    assert choose_shots(index, ["object_1"], shots=3, seed=5)["object_1"] == both["object_1"]  # independent of others
    assert all(len(set(paths)) == 3 and all("/train/good/" in str(p) for p in paths) for paths in both.values())
    assert len({tuple(choose_shots(index, ["object_0"], shots=3, seed=seed)["object_0"]) for seed in range(10)}) > 5
    with pytest.raises(ValueError, match=r"class 'object_0' has 8 normal train image\(s\); --shots 9 needs 9"):
        choose_shots(index, ["object_0"], shots=9, seed=5)


@pytest.mark.slow
def test_four_shots_lift_pixel_auroc_without_lowering_image_auroc(
    demo_checkpoint: Path, unseen: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = ["test", "--data", str(unseen), "--checkpoint", str(demo_checkpoint), *MODEL_ARGS]
    assert main([*args, "--out", str(tmp_path / "zero")]) == 0
    assert main([*args, "--out", str(tmp_path / "four"), "--shots", "4", "--seed", "3"]) == 0
    zero, four = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("zero", "four"))
    assert four["mean"]["pixel_auroc"] >= zero["mean"]["pixel_auroc"] + 0.05
    assert four["mean"]["image_auroc"] >= zero["mean"]["image_auroc"]
    assert four["model"]["references"] == {
        "rule": {"weight": 0.75, "sigma": None, "distance": "1 - max cosine, clipped to [0, 1]"},
        "shots": 4, "seed": 3, "source": "normal train images",
    }  # fmt: skip
    used = four["reference_images"]
    assert sorted(used) == ["object_0", "object_1"] and all(len(paths) == 4 for paths in used.values())
    assert all(Path(path).is_file() and f"/{name}/train/good/" in path for name in used for path in used[name])
    assert "reference_images" not in zero and zero["model"]["references"] is None
    assert "few-shot: 4 normal train image(s) per class" in (tmp_path / "four/results.md").read_text()
    assert len(list((tmp_path / "xdg/vip2clip/references").glob("*.npy"))) == 2  # one memory per class


def test_more_shots_than_normal_train_images(unseen: Path, tmp_path: Path, capsys) -> None:
    # Found before the model is built (the checkpoint does not even exist) and, by benchmark, before training.
    test = ["test", "--data", str(unseen), "--out", str(tmp_path / "t"), "--checkpoint", "x.pt", *MODEL_ARGS]
    assert main([*test, "--shots", "9"]) == 2
    assert "class 'object_0' has 8 normal train image(s); --shots 9 needs 9" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main(["benchmark", "--train", f"s={unseen}", "--test", f"s={unseen}", "--out", str(out), "--shots", "9",
                 "--random-init", *MODEL_ARGS]) == 2  # fmt: skip
    assert "--shots 9 needs 9" in capsys.readouterr().err and not (out / "train").exists()
    assert main([*test, "--shots", "-1"]) == 2
    assert "--shots must be >= 0" in capsys.readouterr().err
