"""`vip2clip benchmark`, `test` and `convert-checkpoint` on two tiny synthetic datasets (train one, test the other)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

import vip2clip
from vip2clip.cli import main
from vip2clip.data.index import build_index, read_index, write_index
from vip2clip.data.synthetic import generate_benchmark

# One epoch leaves the maps nearly flat, so the AUPRO of a class may be undefined (NaN): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--top-k", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One benchmark run: train 1 epoch on a textured set, evaluate zero-shot on a structured one."""
    base = tmp_path_factory.mktemp("benchmark")
    train_root, test_root = base / "textured", base / "structured"
    sizes = {"classes": 2, "image_size": 48, "n_train_good": 0}
    generate_benchmark(train_root, seed=1, style="textured", n_test_good=3, n_test_defect=4, **sizes)
    generate_benchmark(test_root, seed=2, style="structured", n_test_good=2, n_test_defect=3, **sizes)
    out = base / "out"
    argv = ["benchmark", "--train", f"textured={train_root}", "--test", f"synth-objects={test_root}",
            "--out", str(out), "--epochs", "1", "--train-batch-size", "4", "--eval-batch-size", "3", "--no-progress",
            *MODEL_ARGS]  # fmt: skip
    assert main(argv) == 0
    return {"out": out, "test_root": test_root, "train_root": train_root, "checkpoint": out / "train/checkpoint.pt"}


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.slow
def test_benchmark_writes_the_combined_table_and_per_dataset_folders(run: dict[str, Path]) -> None:
    out = run["out"]
    rows = _rows((out / "benchmark.md").read_text(encoding="utf-8"))
    assert rows[0] == ["Task", "Datasets", "C", "ViP²-CLIP"]
    assert [r[1] for r in rows[2:]] == ["synth-objects", "AVERAGE"] * 2
    assert rows[2][0].startswith("Image-level") and rows[4][0].startswith("Pixel-level")
    assert rows[3][3] == rows[2][3]  # one dataset: its AVERAGE is itself
    folder = out / "synth-objects"
    for name in ("results.md", "results.csv", "results.json", "calibration.json"):
        assert (folder / name).is_file(), name
    per_dataset = json.loads((folder / "results.json").read_text())
    combined = json.loads((out / "benchmark.json").read_text())
    assert combined["datasets"][0]["mean"] == per_dataset["mean"]
    assert combined["training"]["name"] == "textured" and combined["training"]["config"]["epochs"] == 1
    assert combined["training"]["config"]["batch_size"] == 4
    assert per_dataset["model"]["top_k"] == 4 and per_dataset["model"]["checkpoint"] == str(run["checkpoint"].resolve())
    assert [c["name"] for c in per_dataset["classes"]] == ["object_0", "object_1"]


@pytest.mark.slow
def test_benchmark_reference_paper_matches_by_dataset_name(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`--test visa=ROOT` is compared with the paper's VisA row; a label the paper lacks gets "-"."""
    out = tmp_path / "ref"
    root = run["test_root"]
    argv = ["benchmark", "--checkpoint", str(run["checkpoint"]), "--test", f"visa={root}", f"mine={root}",
            "--reference", "paper", "--out", str(out), "--no-progress", "--eval-batch-size", "3",
            *MODEL_ARGS]  # fmt: skip
    assert main(argv) == 0
    assert "| paper | ours - paper |" in capsys.readouterr().out
    rows = _rows((out / "benchmark.md").read_text(encoding="utf-8"))
    assert rows[0][4:] == ["paper", "ours - paper"]
    paper = (88.5, 90.4, 84.8)
    assert rows[2][1] == "VisA" and rows[2][4] == f"{paper}"  # Table 1, ViP²-CLIP column
    ours = [float(v) for v in rows[2][3].strip("()").split(", ")]
    differences = [f"{round(o - p, 1) or 0.0:+.1f}" for o, p in zip(ours, paper, strict=True)]
    assert rows[2][5] == "(" + ", ".join(differences) + ")"
    assert rows[3][1] == "mine" and rows[3][4:] == ["-", "-"]
    data = json.loads((out / "benchmark.json").read_text())
    assert data["reference"]["datasets"][0]["values"]["pixel_aupro"] == 0.922
    per_dataset = (out / "visa/results.md").read_text(encoding="utf-8")  # classes object_0/1: not in Tables 10-15
    assert "### Compared with the paper" in per_dataset and "| object_0 | - | - |" in per_dataset
    assert json.loads((out / "mine/results.json").read_text())["reference"]["dataset"] is None


@pytest.mark.slow
def test_test_reference_paper_compares_each_class(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`test --dataset visa --reference paper`: classes named as VisA's get Tables 10-15's numbers and our
    difference; the mean of two classes is compared with the mean of the paper's values for those two."""
    index = read_index(run["test_root"])
    names = {"object_0": "candle", "object_1": "pcb1"}
    renamed = [replace(s, cls_name=names[s.cls_name]) for s in index.samples("test")]
    write_index(build_index(index.root, {"test": renamed}), tmp_path / "meta.json")
    out = tmp_path / "out"
    argv = ["test", "--data", str(tmp_path / "meta.json"), "--dataset", "visa", "--reference", "paper",
            "--checkpoint", str(run["checkpoint"]), "--out", str(out), "--no-progress",
            "--backbone", "tiny"]  # fmt: skip
    assert main(argv) == 0
    assert "### Compared with the paper: ViP²-CLIP (Table 10, Table 11," in capsys.readouterr().out
    ours = json.loads((out / "results.json").read_text())
    candle = ours["reference"]["classes"][0]
    assert candle["name"] == "candle" and candle["values"]["image_auroc"] == 0.904
    assert candle["difference"]["image_auroc"] == pytest.approx(ours["classes"][0]["image_auroc"] - 0.904)
    assert ours["reference"]["mean"]["values"]["pixel_f1"] == pytest.approx((0.424 + 0.134) / 2)
    section = (out / "results.md").read_text(encoding="utf-8").split("### Compared with the paper")[1]
    candle_row = next(line for line in section.splitlines() if line.startswith("| candle |"))
    assert candle_row.split("|")[2].strip().startswith("90.4 (")


@pytest.mark.slow
def test_test_command_reproduces_the_benchmark_numbers(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "test"
    # The benchmark's evaluation batches (--eval-batch-size 3): the float rounding of the scores depends on them.
    argv = ["test", "--data", str(run["test_root"]), "--checkpoint", str(run["checkpoint"]), "--out", str(out),
            "--save-maps", "--max-maps", "2", "--no-progress", "--backbone", "tiny",
            "--eval-batch-size", "3"]  # fmt: skip
    assert main(argv) == 0
    assert "| **Mean** |" in capsys.readouterr().out
    ours = json.loads((out / "results.json").read_text())
    benchmark = json.loads((run["out"] / "synth-objects/results.json").read_text())
    assert ours["classes"] == benchmark["classes"]
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["image_threshold"] == ours["thresholds"]["image"]
    assert calibration["model"]["checkpoint_sha256"] == ours["model"]["checkpoint_sha256"]
    assert len(list((out / "maps").rglob("*.png"))) == 4


@pytest.mark.slow
def test_explain_panels_for_test_and_predict(run: dict[str, Path], tmp_path: Path, capsys) -> None:
    """`test --save-maps --explain` explains the images of the panels (same names under explain/);
    `predict --explain` every judged image (the names of its masks/)."""
    out = tmp_path / "test"
    argv = ["test", "--data", str(run["test_root"]), "--checkpoint", str(run["checkpoint"]), "--out", str(out),
            "--save-maps", "--max-maps", "2", "--explain", "--no-progress", "--backbone", "tiny"]  # fmt: skip
    assert main(argv) == 0
    assert "explanations: " in capsys.readouterr().out
    panels = sorted(p.relative_to(out / "maps") for p in (out / "maps").rglob("*.png"))
    explained = sorted(p.relative_to(out / "explain") for p in (out / "explain").rglob("*.png"))
    assert explained == panels and len(explained) == 4
    with Image.open(out / "explain" / explained[0]) as picture:
        # 160-px tiles: input, the tiny backbone's 4 layers and the fused map side by side; maps and two rows of
        # attention under each other
        assert picture.width >= 6 * 160 and picture.height >= 3 * 160
    images = sorted((run["test_root"] / "object_0/test").rglob("*.png"))[:2]
    predicted = tmp_path / "predict"
    argv = ["predict", *map(str, images), "--checkpoint", str(run["checkpoint"]), "--out", str(predicted),
            "--explain", "--no-progress", "--backbone", "tiny"]  # fmt: skip
    assert main(argv) == 0
    masks = sorted(p.relative_to(predicted / "masks") for p in (predicted / "masks").rglob("*.png"))
    assert sorted(p.relative_to(predicted / "explain") for p in (predicted / "explain").rglob("*.png")) == masks
    assert main([*argv[:-3], "--tile", "32", "--no-progress", "--backbone", "tiny"]) == 2  # keeps --explain
    assert "--explain shows the plain model's layers and prompts; not with --tile" in capsys.readouterr().err


@pytest.mark.slow
def test_convert_checkpoint_round_trip_gives_identical_predictions(run: dict[str, Path], tmp_path: Path) -> None:
    release, back = tmp_path / "release.pt", tmp_path / "back.pt"
    process = subprocess.run(
        [sys.executable, "-m", "vip2clip", "convert-checkpoint", str(run["checkpoint"]), str(release), "--to",
         "release"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert set(torch.load(release, weights_only=True)) == {"prompt_learner", "Zero_try"}
    assert main(["convert-checkpoint", str(release), str(back), "--to", "vip2clip"]) == 0
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    original = vip2clip.create_model(checkpoint=run["checkpoint"]).predict(images)
    for path in (release, back):
        model = vip2clip.create_model("tiny", checkpoint=path, image_size=64, top_k=4)
        converted = model.predict(images)
        torch.testing.assert_close(converted.pred_score, original.pred_score, rtol=0, atol=0)
        torch.testing.assert_close(converted.anomaly_map, original.anomaly_map, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["test", "--data", "{root}", "--out", "{tmp}/o", "--backbone", "tiny"], "--checkpoint is required"),
        (
            ["test", "--data", "{root}", "--out", "{tmp}/o", "--checkpoint", "x.pt", "--explain"],
            "--explain goes with --save-maps",
        ),
        (
            ["test", "--data", "{root}", "--out", "{tmp}/o", "--checkpoint", "x.pt", "--reference", "paper"],
            "it has no numbers for 'data'; name the benchmark with --dataset",
        ),
        (["benchmark", "--test", "no-equals-sign", "--out", "{tmp}/o", "--checkpoint", "x.pt"], "NAME=ROOT"),
        (["benchmark", "--test", "mine={tmp}", "--out", "{tmp}/o", "--checkpoint", "x.pt"], "no meta.json"),
        (["benchmark", "--test", "a={root}", "--out", "{tmp}/o"], "--train NAME=ROOT"),
        (["convert-checkpoint", "{tmp}/missing.pt", "{tmp}/x.pt", "--to", "release"], "checkpoint not found"),
    ],
)
def test_user_errors_exit_2_with_a_message(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    root = generate_benchmark(tmp_path / "data", classes=1, image_size=32, n_train_good=0, n_test_good=1,
                              n_test_defect=1).root  # fmt: skip
    filled = [a.format(root=root, tmp=tmp_path) for a in argv]
    assert main(filled) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_image_level_only_data_gives_dashes_and_no_pixel_threshold(
    run: dict[str, Path], tmp_path: Path, caplog, capsys
) -> None:
    index = read_index(run["test_root"])
    no_masks = [replace(s, mask_path="") for s in index.samples("test")]  # like HeadCT / BrainMRI / Br35H
    write_index(build_index(index.root, {"test": no_masks}), tmp_path / "meta.json")
    out = tmp_path / "out"
    argv = ["test", "--data", str(tmp_path / "meta.json"), "--checkpoint", str(run["checkpoint"]), "--out", str(out),
            "--classes", "object_1", "--no-progress", "--backbone", "tiny"]  # fmt: skip
    assert main(argv) == 0
    rows = _rows((out / "results.md").read_text(encoding="utf-8"))
    assert [r[0] for r in rows[2:]] == ["object_1", "**Mean**"]
    assert rows[2][4:] == ["-", "-", "-"] and all(cell != "-" for cell in rows[2][1:4])
    assert "no pixel threshold" in caplog.text
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["pixel_threshold"] is None
    assert calibration["image_threshold"] == json.loads((out / "results.json").read_text())["thresholds"]["image"]
    # Image decisions work with the file alone; masks need an explicit pixel threshold.
    image = str(read_index(run["test_root"]).resolve(no_masks[0].img_path))
    predict = ["predict", image, "--checkpoint", str(run["checkpoint"]), "--calibration", str(out / "calibration.json"),
               "--backbone", "tiny", "--no-progress"]  # fmt: skip
    assert main([*predict, "--out", str(tmp_path / "p1")]) == 2
    assert "has no pixel threshold" in capsys.readouterr().err
    assert main([*predict, "--out", str(tmp_path / "p2"), "--pixel-threshold", "0.6"]) == 0
