"""`vip2clip study main` (Tables 1-2: both training directions, the datasets not given listed as missing) and
`vip2clip study efficiency` (Table 3: our cost beside the paper's), on the tiny backbone and synthetic sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import vip2clip
from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.paper_numbers import load_paper_numbers
from vip2clip.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS
from vip2clip.paper.studies import STUDIES
from vip2clip.paper.study_report import write_study

pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress", "--epochs", "1", "--train-batch-size", "4"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("main_data")
    sizes = {"classes": 1, "image_size": 48, "n_train_good": 0, "n_test_good": 2, "n_test_defect": 2}
    for name, seed, style in (("a", 1, "textured"), ("b", 2, "structured"), ("c", 3, "textured")):
        generate_benchmark(base / name, seed=seed, style=style, **sizes)
    return {name: base / name for name in "abc"}


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_study_list_shows_main_and_efficiency(capsys) -> None:
    assert main(["study", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "main  (Tables 1-2)" in listing and "efficiency  (Table 3)" in listing
    assert "train mvtec -> test visa, mpdd, ksdd, btad, dagm, dtd-synthetic, headct" in listing


def test_study_main_writes_tables_1_and_2_with_both_directions_and_lists_the_missing(roots, tmp_path: Path) -> None:
    out = tmp_path / "main"
    data = ["--data", f"mvtec={roots['a']}", f"visa={roots['b']}", f"mpdd={roots['b']}", f"isic={roots['c']}"]
    assert main(["study", "main", *data, "--out", str(out), *MODEL_ARGS]) == 0
    trained = sorted(p.parent.name for p in (out / "models").rglob("checkpoint.pt"))
    assert trained == ["mvtec", "visa"]  # MVTec AD for the others, VisA for MVTec AD
    report = json.loads((out / "study.json").read_text())
    assert report["protocol"] == [{"train": ["mvtec"], "tests": ["visa", "mpdd", "isic"]},
                                  {"train": ["visa"], "tests": ["mvtec"]}]  # fmt: skip
    expected_missing = [n for n in STUDIES["main"].protocol[0].tests if n not in ("visa", "mpdd", "isic")]
    assert report["missing"] == expected_missing and len(expected_missing) == 10
    markdown = (out / "study.md").read_text()
    table_1, table_2 = markdown.split("## Table 1")[1].split("## Table 2")
    assert "MVTec AD" in table_1 and "VisA" in table_1 and "MPDD" in table_1 and "ISIC" not in table_1
    assert [row[1] for row in _rows(table_2)[2:]] == ["ISIC 2016", "AVERAGE"] * 2  # image block, pixel block
    assert "Missing (no root given, not run): KolektorSDD, BTAD" in markdown
    # the tiny random backbone: no paper column (the shared labelling); the paper's cells: the test below
    assert _rows(table_1)[0] == ["Task", "Datasets", "ViP²-CLIP (ours)"]
    assert "Not comparable with the paper (random CLIP weights; the tiny test backbone)" in markdown


def test_tables_1_and_2_have_the_papers_rows_and_printed_averages(tmp_path: Path) -> None:
    """Every dataset tested (the medical sets with image labels only or masks only, as the real ones): each table
    holds its own datasets, the paper's cells and its printed AVERAGE rows."""
    study = STUDIES["main"]
    image_only, pixel_only = ("headct", "brainmri", "br35h"), ("isic", "colondb", "clinicdb", "kvasir")
    results = {"vip2clip": {}}
    for number, test in enumerate(name for direction in study.protocol for name in direction.tests):
        undefined = PIXEL_KEYS if test in image_only else IMAGE_KEYS if test in pixel_only else ()
        values = {key: math.nan if key in undefined else 0.5 + 0.01 * number for key in METRIC_KEYS}
        results["vip2clip"][test] = [values]
    write_study(tmp_path, study, variants=study.variants, seeds=(111,), results=results, titles=lambda name: name)
    markdown = (tmp_path / "study.md").read_text()
    assert "Missing" not in markdown
    paper = load_paper_numbers()
    for table, text in zip(("Table 1", "Table 2"), markdown.split("## Table ")[1:], strict=True):
        rows = _rows(text)
        names = [row[1] for row in rows[2:] if row[1] != "AVERAGE"]
        assert sorted(set(names)) == sorted(r.dataset for r in paper.rows.values() if r.table == table)
        block = ""
        for row in rows[2:]:
            block = {"Image": "image", "Pixel": "pixel"}.get(row[0].split("-")[0], block)
            printed = paper.averages[(table, block)] if row[1] == "AVERAGE" else paper.row_for(row[1]).values
            keys = IMAGE_KEYS if block == "image" else PIXEL_KEYS
            assert row[3] == "(" + ", ".join(f"{100 * printed[key]:.1f}" for key in keys) + ")", (table, row)


def test_study_main_needs_a_direction_it_can_run(roots, tmp_path: Path, capsys) -> None:
    assert main(["study", "main", "--data", f"visa={roots['b']}", "--out", str(tmp_path / "x"), *MODEL_ARGS]) == 2
    assert "runs nothing with these datasets: it needs mvtec with one of visa" in capsys.readouterr().err


def test_study_efficiency_writes_table_3_with_the_papers_numbers_beside_ours(tmp_path: Path) -> None:
    out = tmp_path / "efficiency"
    argv = ["study", "efficiency", "--backbone", "tiny", "--random-init", "--image-size", "32", "--out", str(out)]
    assert main([*argv, "--repetitions", "3", "--warmup", "0", "--train-batch-size", "2"]) == 0
    record = json.loads((out / "efficiency.json").read_text())
    assert record["paper"]["device"].startswith("NVIDIA L20") and record["settings"]["image_size"] == 32
    (ours,) = record["computations"]
    assert ours["trainable_parameters"] == vip2clip.create_model("tiny").num_trainable_parameters()
    assert len(ours["milliseconds"]) == 3 and min(ours["milliseconds"]) > 0
    assert ours["inference_peak_bytes"] > 0 and ours["training_peak_bytes"] > 0
    rows = _rows((out / "efficiency.md").read_text())
    assert rows[2][1:] == ["NVIDIA L20 GPU (48 GB)", "4.15", "48.69 ± 0.19", "-",
                           '2.21 (its "GPU Cost": training GPU memory, batch 8)', "0.54"]  # fmt: skip
    assert rows[3][0] == "ours: vip2clip" and rows[4][2:] == ["not measured"] * 4 + ["-"]
    markdown = (out / "efficiency.md").read_text()
    assert "release column was not measured: pass --release-dir" in markdown
    assert "Ours against the paper's row: not comparable: the tiny test backbone; 32 px (the paper's 518)" in markdown


def test_study_efficiency_refuses_a_folder_that_is_not_the_release(tmp_path: Path, capsys) -> None:
    argv = ["study", "efficiency", "--backbone", "tiny", "--random-init", "--out", str(tmp_path / "x")]
    assert main([*argv, "--release-dir", str(tmp_path)]) == 2
    assert "not a clone of the authors' release (no test.py and VIP2CLIP_lib/)" in capsys.readouterr().err
    assert main([*argv, "--repetitions", "0"]) == 2
    assert "--repetitions must be >= 1 and --warmup >= 0, got 0 and 3" in capsys.readouterr().err
