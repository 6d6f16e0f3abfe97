"""Training on several datasets at once (`train --data A --data B`, Table 9's protocol): one stream, the sources
named with their counts, duplicates counted once, different image sizes reported."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vip2clip.cli import main
from vip2clip.data.index import DatasetIndex, read_index, write_index
from vip2clip.data.sources import merge_sources
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import load_checkpoint

MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--top-k", "4", "--no-progress"]
TRAIN_ARGS = ["--epochs", "2", "--train-batch-size", "3"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("sources")
    sizes = {"classes": 1, "n_train_good": 0, "n_test_good": 2, "n_test_defect": 3}
    generate_benchmark(base / "a", seed=1, style="textured", image_size=48, **sizes)
    generate_benchmark(base / "b", seed=2, style="structured", image_size=48, **sizes)
    return base / "a", base / "b"


def _merged_by_hand(roots: tuple[Path, Path], folder: Path) -> Path:
    """One meta.json listing the test images of both roots, first A's then B's, as a user would write it."""
    test = {}
    for root in roots:
        index = read_index(root)
        for name, samples in index.splits["test"].items():
            test[f"{root.name}-{name}"] = [
                replace(
                    s,
                    cls_name=f"{root.name}-{name}",  # a row's cls_name names the class it is listed under
                    img_path=str(index.resolve(s.img_path)),
                    mask_path=str(index.resolve(s.mask_path)) if s.mask_path else "",
                )
                for s in samples
            ]
    folder.mkdir()
    return write_index(DatasetIndex(folder, {"test": test}), folder)


@pytest.mark.slow
def test_two_sources_train_exactly_as_one_merged_index(sources, tmp_path: Path) -> None:
    a, b = sources
    assert (
        main(
            ["train", "--data", f"a={a}", "--data", f"b={b}", "--out", str(tmp_path / "two"), *TRAIN_ARGS, *MODEL_ARGS]
        )
        == 0
    )
    merged = _merged_by_hand(sources, tmp_path / "merged")
    assert main(["train", "--data", str(merged), "--out", str(tmp_path / "one"), *TRAIN_ARGS, *MODEL_ARGS]) == 0
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert two.state.keys() == one.state.keys()
    for key, value in two.state.items():
        assert torch.equal(value, one.state[key]), key
    assert [(s["name"], s["images"], s["normal"], s["anomalous"]) for s in two.meta["sources"]] == [
        ("a", 5, 2, 3),
        ("b", 5, 2, 3),
    ]
    assert two.meta["training_images"]["count"] == 10
    log = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["sources"] == ["a: 5 images", "b: 5 images"]
    # A second source changes the run: the weights differ from training on A alone.
    assert main(["train", "--data", str(a), "--out", str(tmp_path / "a"), *TRAIN_ARGS, *MODEL_ARGS]) == 0
    alone = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert any(not torch.equal(value, alone.state[key]) for key, value in two.state.items())


def test_the_same_image_in_two_sources_is_counted_once(sources, tmp_path: Path) -> None:
    a, _ = sources
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    merged = merge_sources([("a", read_index(a)), ("copy", read_index(copy))])
    assert [(s.name, s.images, s.duplicates) for s in merged.sources] == [("a", 5, 0), ("copy", 0, 5)]
    assert len(merged.index.samples("test")) == 5
    assert any("5 image(s) of training source copy are also in a" in m for m in merged.messages)


def test_sources_of_different_image_sizes_are_reported(sources, tmp_path: Path) -> None:
    a, _ = sources
    big = generate_benchmark(
        tmp_path / "big", classes=1, seed=3, image_size=64, n_train_good=0, n_test_good=1, n_test_defect=1
    )
    merged = merge_sources([("a", read_index(a)), ("big", big)])
    assert [s.sizes for s in merged.sources] == [("48x48",), ("64x64",)]
    assert any("different image sizes (a: 48x48; big: 64x64)" in m for m in merged.messages)
    same = merge_sources([("a", read_index(a)), ("b", read_index(sources[1]))])
    assert not same.messages


def test_two_sources_with_one_name_and_dataset_flag_are_refused(sources, tmp_path: Path, capsys) -> None:
    a, b = sources
    assert (
        main(
            [
                "train",
                "--data",
                str(a),
                "--data",
                str(b),
                "--dataset",
                "mvtec",
                "--out",
                str(tmp_path / "x"),
                *MODEL_ARGS,
            ]
        )
        == 2
    )
    assert "NAME=ROOT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="same name"):
        merge_sources([("a", read_index(a)), ("a", read_index(b))])


def _train(data: list[str], out: Path, *extra: str) -> int:
    return main(["train", *(arg for text in data for arg in ("--data", text)), "--out", str(out), *extra, *MODEL_ARGS])


@pytest.mark.parametrize(
    ("form", "advice"),
    [
        (lambda a, b: [f"x={a}", f"x={b}"], "both named 'x' (x="),  # said "name them NAME=ROOT", the form used
        (lambda a, b: [str(a), f"{b.parent / 'other' / a.name}"], "name them NAME=ROOT with a NAME of their own"),
    ],
)
def test_two_sources_of_one_name_get_advice_for_the_form_given(sources, tmp_path: Path, capsys, form, advice) -> None:
    a, b = sources
    other = b.parent / "other" / a.name  # another dataset in a folder of the same name
    if not other.exists():
        shutil.copytree(b, other)
    assert _train(form(a, b), tmp_path / "x") == 2
    error = capsys.readouterr().err
    assert advice in error
    if "x=" in advice:
        assert "give each NAME=ROOT a NAME of its own" in error


def test_a_folder_without_meta_json_among_several_sources_gets_advice_that_works(sources, tmp_path, capsys) -> None:
    """Issue 27 minor: the advice was --dataset, which several --data refuse."""
    native = tmp_path / "native"
    shutil.copytree(sources[0] / read_index(sources[0]).classes()[0], native / "part")
    assert _train([str(native), str(sources[1])], tmp_path / "x") == 2
    error = capsys.readouterr().err
    assert "with several --data, name its benchmark as NAME=ROOT" in error and "pass --dataset" not in error


def test_skip_bad_skips_a_listed_but_missing_file_of_a_source(sources, tmp_path: Path, capsys) -> None:
    """Issue 27 minor: merging the sources hashed every listed file first, so a missing one stopped --skip-bad."""
    damaged = tmp_path / "damaged"
    shutil.copytree(sources[1], damaged)
    missing = read_index(damaged).resolve(read_index(damaged).samples("test")[0].img_path)
    Path(missing).unlink()
    assert _train([f"a={sources[0]}", f"b={damaged}"], tmp_path / "refused", "--epochs", "1") == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert _train([f"a={sources[0]}", f"b={damaged}"], tmp_path / "run", "--epochs", "1", "--skip-bad") == 0
    assert f"skipped {missing}: no such file" in capsys.readouterr().out
