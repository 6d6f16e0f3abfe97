"""Report tables: the paper's layout in markdown, full precision in CSV and strict JSON, atomic files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from vip2clip.evaluation.reports import (
    CLASS_HEADER,
    BenchmarkEntry,
    benchmark_table_markdown,
    class_table_markdown,
    percent,
    write_benchmark,
    write_results,
)
from vip2clip.evaluation.results import ClassResult, EvaluationResult, mean_metrics
from vip2clip.metrics import METRIC_KEYS

NAN = math.nan


def _result(rows: dict[str, tuple[float, ...]], thresholds: tuple[float, float] = (0.61, 0.43)) -> EvaluationResult:
    classes = [
        ClassResult(
            name=name,
            n_normal=4,
            n_anomalous=6,
            metrics=dict(zip(METRIC_KEYS, values, strict=True)),
            image_threshold=0.5,
            pixel_threshold=0.4,
        )
        for name, values in rows.items()
    ]
    image_threshold, pixel_threshold = thresholds
    return EvaluationResult(
        classes=classes,
        mean=mean_metrics(classes),
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        skipped=[("/x/bad.png", "truncated")],
    )


FULL = _result(
    {
        "bottle": (0.91234, 0.96, 0.92049, 0.905, 0.871, 0.431),
        "cable": (0.5, 0.752, 0.66666, 0.801, NAN, 0.231),
    }
)
IMAGE_ONLY = _result({"brain": (0.943, 0.939, 0.881, NAN, NAN, NAN)})
PIXEL_ONLY = _result({"skin": (NAN, NAN, NAN, 0.903, 0.823, 0.737)})


def _table_rows(markdown: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")
    ]


def test_percent_formatting() -> None:
    assert [percent(v) for v in (0.91234, 0.0005, 1.0, NAN)] == ["91.2", "0.1", "100.0", "-"]


def test_class_table_has_the_paper_layout() -> None:
    rows = _table_rows(class_table_markdown(FULL, "MVTec AD"))
    assert rows[0] == list(CLASS_HEADER) and set(rows[1]) == {"---"}
    assert rows[2] == ["bottle", "91.2", "96.0", "92.0", "90.5", "87.1", "43.1"]
    assert rows[3] == ["cable", "50.0", "75.2", "66.7", "80.1", "-", "23.1"]
    # Mean of the full-precision values, then rounded; PRO's mean skips the undefined class.
    assert rows[4] == ["**Mean**", "**70.6**", "**85.6**", "**79.4**", "**85.3**", "**87.1**", "**33.1**"]
    assert len(rows) == 5
    noted = class_table_markdown(FULL, "MVTec AD", notes=["random weights"])
    assert noted.index("**Note:** random weights") < noted.index("| Class |")


def test_the_undefined_footnote_only_under_tables_with_a_dash() -> None:
    """Issue 17 item 15: "'-': undefined for this data" was printed under tables without any "-"."""
    assert "'-': undefined for this data" in class_table_markdown(FULL, "MVTec AD")  # cable's PRO is "-"
    complete = _result({"bottle": (0.91, 0.96, 0.92, 0.905, 0.871, 0.431)})
    assert "undefined" not in class_table_markdown(complete, "MVTec AD")


def test_benchmark_table_has_the_table_1_2_layout() -> None:
    entries = [
        BenchmarkEntry("MVTec AD", FULL),
        BenchmarkEntry("HeadCT", IMAGE_ONLY),
        BenchmarkEntry("ISIC", PIXEL_ONLY),
    ]
    rows = _table_rows(benchmark_table_markdown(entries, method="ViP²-CLIP"))
    assert rows[0] == ["Task", "Datasets", "C", "ViP²-CLIP"]
    body = rows[2:]
    # Image block: MVTec and HeadCT (ISIC has no image metrics), then AVERAGE; pixel block: MVTec, ISIC, AVERAGE.
    assert [r[1] for r in body] == ["MVTec AD", "HeadCT", "AVERAGE", "MVTec AD", "ISIC", "AVERAGE"]
    assert body[0][0] == "Image-level (AUROC, AP, F1)" and body[3][0] == "Pixel-level (AUROC, PRO, F1)"
    assert body[0][2:] == ["2", "(70.6, 85.6, 79.4)"]
    image_average = [(FULL.mean[k] + IMAGE_ONLY.mean[k]) / 2 for k in METRIC_KEYS[:3]]
    assert body[2] == ["", "AVERAGE", "-", "(" + ", ".join(percent(v) for v in image_average) + ")"]
    pixel_average = [(FULL.mean[k] + PIXEL_ONLY.mean[k]) / 2 for k in METRIC_KEYS[3:]]
    assert body[5][3] == "(" + ", ".join(percent(v) for v in pixel_average) + ")"


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_result_files_parse_with_full_precision(tmp_path: Path) -> None:
    context = {"checkpoint": tmp_path / "c.pt", "config": {"top_k": 50}}
    files = write_results(tmp_path, FULL, context=context, title="x", notes=["synthetic data"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md"]
    with files["csv"].open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["class"] for r in rows] == ["bottle", "cable", "mean"]
    assert float(rows[0]["image_auroc"]) == 0.91234 and rows[1]["pixel_aupro"] == ""
    assert float(rows[2]["pixel_f1"]) == pytest.approx((0.431 + 0.231) / 2, abs=0)
    data = _strict_json(files["json"])
    assert data["checkpoint"] == str(tmp_path / "c.pt") and data["config"] == {"top_k": 50}
    assert data["classes"][1]["pixel_aupro"] is None and data["classes"][0]["image_f1"] == 0.92049
    assert data["mean"]["pixel_aupro"] == 0.871 and data["thresholds"] == {"image": 0.61, "pixel": 0.43}
    assert data["skipped"] == [{"path": "/x/bad.png", "reason": "truncated"}]
    assert data["notes"] == ["synthetic data"]


def test_benchmark_files(tmp_path: Path) -> None:
    entries = [BenchmarkEntry("MVTec AD", FULL), BenchmarkEntry("HeadCT", IMAGE_ONLY)]
    files = write_benchmark(tmp_path, entries, context={"training": {"name": "VisA"}})
    data = _strict_json(files["json"])
    assert [d["name"] for d in data["datasets"]] == ["MVTec AD", "HeadCT"]
    assert data["average"]["Pixel-level (AUROC, PRO, F1)"]["pixel_auroc"] == FULL.mean["pixel_auroc"]
    with files["csv"].open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["dataset"] for r in rows] == ["MVTec AD", "HeadCT", "AVERAGE"]
    assert float(rows[2]["image_auroc"]) == pytest.approx((FULL.mean["image_auroc"] + 0.943) / 2, abs=0)
    assert rows[1]["pixel_auroc"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind
