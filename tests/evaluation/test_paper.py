"""`benchmark --reference paper`: the paper's numbers (one data file), matching by registry name, differences."""

from __future__ import annotations

import csv
import json
import math
from importlib import resources
from pathlib import Path

import pytest

from vip2clip.data.registry import DATASETS
from vip2clip.evaluation.paper_numbers import load_paper_numbers
from vip2clip.evaluation.reports import BenchmarkEntry, benchmark_table_markdown, write_benchmark
from vip2clip.evaluation.results import ClassResult, EvaluationResult, mean_metrics
from vip2clip.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS

NAN = math.nan
PAPER = load_paper_numbers("paper")


def _result(values: tuple[float, ...]) -> EvaluationResult:
    classes = [ClassResult(name="c", n_normal=3, n_anomalous=3, metrics=dict(zip(METRIC_KEYS, values, strict=True)))]
    return EvaluationResult(classes=classes, mean=mean_metrics(classes), image_threshold=0.5, pixel_threshold=0.5)


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_every_table_average_is_the_mean_of_its_rows() -> None:
    """Catches a typo in the transcription: the paper's printed AVERAGE rows must follow from its dataset rows."""
    data = json.loads(resources.files("vip2clip.evaluation").joinpath("paper_results.json").read_text("utf-8"))
    checked = 0
    for table in data["tables"]:
        for block in ("image", "pixel"):
            rows = [entry[block] for entry in table["datasets"] if entry[block] is not None]
            for position, printed in enumerate(table["average"][block]):
                mean = math.fsum(row[position] for row in rows) / len(rows)
                assert abs(mean - printed) <= 0.05 + 1e-9, (table["table"], block, position, mean, printed)
                checked += 1
    assert checked == 12  # two tables x two blocks x three metrics
    assert [len(t["datasets"]) for t in data["tables"]] == [7, 7]


def test_paper_values_as_printed() -> None:
    assert set(PAPER.rows) <= set(DATASETS)  # every dataset is a registry name
    assert len(PAPER.rows) == 14
    visa = PAPER.row_for("visa")
    assert visa.table == "Table 1" and visa.values["image_auroc"] == 0.885 and visa.values["pixel_aupro"] == 0.922
    assert PAPER.row_for("MVTec AD").values["pixel_f1"] == 0.431  # by registry title
    assert PAPER.row_for("kvasir-seg").values["pixel_aupro"] == 0.478  # by alias
    assert PAPER.row_for("Br35H").printed_name == "Brain35H" and PAPER.row_for("br35h").table == "Table 2"
    assert set(PAPER.row_for("headct").values) == set(IMAGE_KEYS)  # image-level only, as in Table 2
    assert set(PAPER.row_for("isic").values) == set(PIXEL_KEYS)
    assert PAPER.row_for("my-parts") is None and PAPER.row_for("folder") is None
    with pytest.raises(ValueError, match="unknown reference"):
        load_paper_numbers("arxiv")


def test_block_average_is_the_printed_one_for_a_whole_table() -> None:
    industrial = ["mvtec", "visa", "mpdd", "ksdd", "btad", "dagm", "dtd-synthetic"]
    assert PAPER.block_average(industrial, PIXEL_KEYS) == {"pixel_auroc": 0.962, "pixel_aupro": 0.923,
                                                            "pixel_f1": 0.496}  # fmt: skip
    assert PAPER.block_average(["ISIC 2016", "colondb", "clinicdb", "kvasir"], PIXEL_KEYS)["pixel_aupro"] == 0.693
    subset = PAPER.block_average(["visa", "mpdd"], IMAGE_KEYS)
    assert subset["image_auroc"] == pytest.approx((0.885 + 0.797) / 2)  # not a whole table: the mean
    assert PAPER.block_average(["visa", "mine"], IMAGE_KEYS) is None  # one dataset the paper lacks
    assert PAPER.block_average(["headct"], PIXEL_KEYS) is None  # a block the paper does not report for it


ENTRIES = [
    BenchmarkEntry("VisA", _result((0.88149, 0.9, 0.845, 0.95, 0.92, 0.336))),
    BenchmarkEntry("HeadCT", _result((0.9, 0.9, 0.9, 0.8, 0.7, 0.6))),  # our copy has masks, the paper's none
    BenchmarkEntry("my-parts", _result((0.5, 0.5, NAN, 0.5, 0.5, 0.5))),
]


def test_reference_columns_and_differences() -> None:
    rows = _rows(benchmark_table_markdown(ENTRIES, paper=PAPER))
    assert rows[0] == ["Task", "Datasets", "C", "ViP²-CLIP", "paper", "ours - paper"]
    body = {(r[0] or "", r[1]): r[3:] for r in rows[2:]}
    image, pixel = rows[2][0], rows[6][0]
    assert body[(image, "VisA")] == ["(88.1, 90.0, 84.5)", "(88.5, 90.4, 84.8)", "(-0.4, -0.4, -0.3)"]
    assert rows[3][1:] == ["HeadCT", "1", "(90.0, 90.0, 90.0)", "(94.3, 93.9, 88.1)", "(-4.3, -3.9, +1.9)"]
    assert rows[4][1:] == ["my-parts", "1", "(50.0, 50.0, -)", "-", "-"]  # unknown to the paper
    assert rows[5][1:] == ["AVERAGE", "-", "(76.0, 76.7, 87.2)", "-", "-"]  # the paper has no my-parts
    assert body[(pixel, "VisA")][2] == "(-0.4, -0.2, +0.0)"  # 33.6 - 33.6: no "-0.0"
    assert rows[7][1] == "HeadCT" and rows[7][4:] == ["-", "-"]  # no pixel numbers for HeadCT in the paper
    assert "Tables 1 and 2" in benchmark_table_markdown(ENTRIES, paper=PAPER)
    assert _rows(benchmark_table_markdown(ENTRIES))[0] == ["Task", "Datasets", "C", "ViP²-CLIP"]  # unchanged without


def test_reference_average_over_the_same_datasets() -> None:
    entries = [BenchmarkEntry("visa", _result((0.9,) * 6)), BenchmarkEntry("mpdd", _result((0.8,) * 6))]
    rows = _rows(benchmark_table_markdown(entries, paper=PAPER))
    average = next(r for r in rows if r[1] == "AVERAGE")
    paper = [(0.885 + 0.797) / 2, (0.904 + 0.845) / 2, (0.848 + 0.824) / 2]
    assert average[4] == "(" + ", ".join(f"{100 * v:.1f}" for v in paper) + ")"
    assert average[5] == "(" + ", ".join(f"{85.0 - float(f'{100 * v:.1f}'):+.1f}" for v in paper) + ")"


def test_reference_in_the_csv_and_json(tmp_path: Path) -> None:
    files = write_benchmark(tmp_path, ENTRIES, context={"training": {"name": "MVTec AD"}}, paper=PAPER)
    with files["csv"].open(newline="") as stream:
        rows = {row["dataset"]: row for row in csv.DictReader(stream)}
    assert rows["VisA"]["reference_table"] == "Table 1" and float(rows["VisA"]["reference_image_auroc"]) == 0.885
    assert float(rows["VisA"]["difference_image_auroc"]) == pytest.approx(0.88149 - 0.885, abs=1e-12)
    assert rows["HeadCT"]["reference_pixel_auroc"] == "" and rows["HeadCT"]["difference_pixel_auroc"] == ""
    assert rows["my-parts"]["reference_table"] == "" and rows["AVERAGE"]["reference_image_auroc"] == ""
    data = json.loads(files["json"].read_text(encoding="utf-8"))
    paper = data["reference"]
    assert paper["name"] == "paper" and "Table" in paper["source"]
    visa, headct, mine = paper["datasets"]
    assert visa["table"] == "Table 1" and visa["printed_name"] == "VisA"
    assert visa["difference"]["pixel_aupro"] == pytest.approx(0.92 - 0.922, abs=1e-12)
    assert set(headct["difference"]) == set(IMAGE_KEYS)
    assert mine == {"name": "my-parts", "table": None, "values": {}, "difference": {}}
    assert paper["average"]["Image-level (AUROC, AP, F1)"] is None
