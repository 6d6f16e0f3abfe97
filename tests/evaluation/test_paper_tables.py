"""The paper's studies (Tables 4, 5, 6, 9) and per-class numbers (Tables 10-21) in paper_results.json: the
transcription re-derives what the paper states elsewhere, the lookups, and the per-class comparison in results."""

from __future__ import annotations

import csv
import json
import math
from importlib import resources
from pathlib import Path

import pytest

from vip2clip.config import ModelConfig
from vip2clip.evaluation.paper_numbers import load_paper_numbers
from vip2clip.evaluation.reports import write_results
from vip2clip.evaluation.results import ClassResult, EvaluationResult, mean_metrics
from vip2clip.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS

PAPER = load_paper_numbers("paper")
DATA = json.loads(resources.files("vip2clip.evaluation").joinpath("paper_results.json").read_text("utf-8"))
ROUNDING = 0.05 + 1e-9  # a mean of printed one-decimal values vs. the printed (rounded) mean


def _printed_row(dataset: str) -> dict[str, float]:
    """Tables 1-2's row of a dataset, in printed percent."""
    entry = next(e for t in DATA["tables"] for e in t["datasets"] if e["dataset"] == dataset)
    return dict(zip(METRIC_KEYS, [*entry["image"], *entry["pixel"]], strict=True))


def test_class_means_are_the_printed_means_and_the_rows_of_table_1() -> None:
    """Tables 10-21: each metric's class values average to its printed Mean row, which is Table 1's row."""
    checked = 0
    for entry in DATA["per_class"]:
        table_1 = _printed_row(entry["dataset"])
        assert len(entry["classes"]) == next(e["classes"] for t in DATA["tables"] for e in t["datasets"]
                                             if e["dataset"] == entry["dataset"])  # fmt: skip
        assert list(entry["metrics"]) == list(METRIC_KEYS)
        for key, metric in entry["metrics"].items():
            assert len(metric["values"]) == len(entry["classes"])
            mean = math.fsum(metric["values"]) / len(metric["values"])
            assert abs(mean - metric["mean"]) <= ROUNDING, (entry["dataset"], key, metric["table"], mean)
            assert metric["mean"] == table_1[key], (entry["dataset"], key)
            checked += 1
    assert checked == 12
    tables = sorted(int(m["table"].split()[1]) for e in DATA["per_class"] for m in e["metrics"].values())
    assert tables == list(range(10, 22))  # every table once


def test_the_full_model_rows_of_the_studies_are_table_1() -> None:
    """The paper's default model (all modules, good/damaged) is the row of Table 1 in Tables 4 and 6."""
    for study, key in (("modules", "utpa+vca+fgp"), ("state-words", "good-damaged")):
        variant = PAPER.study(study).variant(key)
        for dataset in ("mvtec", "visa"):
            assert variant.values[dataset] == PAPER.row_for(dataset).values, (study, dataset)


def test_table_9_averages_are_the_mean_of_its_rows() -> None:
    medical = PAPER.study("medical")
    values = medical.variant("fine-tuned").values
    for keys in (IMAGE_KEYS, PIXEL_KEYS):
        rows = [v for v in values.values() if keys[0] in v]
        for key in keys:
            mean = math.fsum(row[key] for row in rows) / len(rows)
            assert abs(mean - medical.averages["image" if key in IMAGE_KEYS else "pixel"][key]) <= ROUNDING / 100
    assert len(values) == 8 and medical.values_for("fine-tuned", "Endo")["pixel_f1"] == 0.652
    assert medical.training == {"default": ("mvtec", "colondb"), "colondb": ("visa", "clinicdb")}


def test_study_variants_name_valid_model_options() -> None:
    expected = {
        "modules": ("Table 4", 7), "alignment": ("Table 5", 2), "state-words": ("Table 6", 4), "medical": ("Table 9", 1)
    }  # fmt: skip
    assert {name: (s.table, len(s.variants)) for name, s in PAPER.studies.items()} == expected
    for study in PAPER.studies.values():
        for variant in study.variants.values():
            ModelConfig().updated(**variant.model_options)  # raises on an unknown option
    modules = PAPER.study("modules")
    fgp = ModelConfig().updated(**modules.variant("fgp").model_options)
    assert (fgp.use_utpa, fgp.use_vca, fgp.use_fgp) == (False, False, True)
    assert modules.variant("none").values["visa"]["pixel_f1"] == 0.028
    assert PAPER.study("alignment").values_for("dual", "MVTec AD")["pixel_aupro"] == 0.246
    words = PAPER.study("state-words").variant("perfect-flawed")
    assert ModelConfig().updated(**words.model_options).state_words == ("perfect", "flawed")
    with pytest.raises(ValueError, match="its variants: none, vca, fgp"):
        modules.variant("all")
    with pytest.raises(ValueError, match="its studies: modules, alignment, state-words, medical"):
        PAPER.study("top-k")


def test_class_lookups() -> None:
    metal_nut = PAPER.class_row("MVTec AD", "Metal Nut")
    assert metal_nut == PAPER.class_row("mvtec", "metal_nut") and metal_nut.printed_name == "Metal Nut"
    assert metal_nut.values["image_f1"] == 0.903 and metal_nut.tables["image_f1"] == "Table 21"
    assert PAPER.class_row("visa", "pipe_fryum").values["pixel_auroc"] == 0.952
    assert PAPER.class_row("visa", "Pipe_fryum").tables["pixel_auroc"] == "Table 10"
    assert PAPER.class_row("visa", "bottle") is None and PAPER.class_row("mpdd", "tubes") is None
    assert PAPER.class_mean("visa") == PAPER.row_for("visa").values and PAPER.class_mean("mpdd") is None


def test_compare_classes_means() -> None:
    every = PAPER.compare_classes("visa", [row.class_name for row in PAPER.classes["visa"].values()])
    assert every.mean == PAPER.row_for("visa").values and every.mean_source == "Table 1"
    assert every.tables == [f"Table {n}" for n in (1, *range(10, 16))]
    part = PAPER.compare_classes("VisA", ["candle", "pcb1"])
    assert part.mean["image_auroc"] == pytest.approx((0.904 + 0.908) / 2) and "these classes" in part.mean_source
    assert PAPER.compare_classes("visa", ["candle", "mine"]).mean is None  # one class the paper lacks
    no_classes = PAPER.compare_classes("mpdd", ["tubes"])
    assert no_classes.classes == {"tubes": None} and no_classes.mean_source == "Table 1"
    assert PAPER.compare_classes("my-parts", ["a"]) is None


def _result(names: list[str], value: float) -> EvaluationResult:
    classes = [
        ClassResult(name=name, n_normal=3, n_anomalous=3, metrics=dict.fromkeys(METRIC_KEYS, value)) for name in names
    ]
    return EvaluationResult(classes=classes, mean=mean_metrics(classes), image_threshold=0.5, pixel_threshold=0.5)


def test_results_files_compare_each_class(tmp_path: Path) -> None:
    result = _result(["candle", "mine"], 0.9)
    files = write_results(tmp_path, result, context={}, title="VisA", paper=PAPER, dataset="visa")
    markdown = files["markdown"].read_text(encoding="utf-8")
    section = markdown.split("### Compared with the paper")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ")}  # fmt: skip
    assert rows["candle"][0] == "90.4 (-0.4)" and rows["candle"][5] == "42.4 (+47.6)"
    assert rows["mine"] == ["-"] * 6 and rows["**Mean**"] == ["-"] * 6  # the paper has no mean over "mine"
    assert "Table 10" in section and "Table 15" in section
    with files["csv"].open(newline="") as stream:
        table = {row["class"]: row for row in csv.DictReader(stream)}
    assert float(table["candle"]["reference_image_auroc"]) == 0.904
    assert float(table["candle"]["difference_image_auroc"]) == pytest.approx(0.9 - 0.904)
    assert table["mine"]["reference_image_auroc"] == "" and table["mean"]["difference_pixel_f1"] == ""
    data = json.loads(files["json"].read_text(encoding="utf-8"))["reference"]
    assert data["dataset"] == "visa" and data["classes"][0]["tables"]["image_ap"] == "Table 14"
    assert data["classes"][1] == {"name": "mine", "tables": {}, "values": {}, "difference": {}}
    plain = write_results(tmp_path / "plain", result, context={}, title="VisA")
    assert "Compared with" not in plain["markdown"].read_text() and "reference" not in plain["csv"].read_text()


def test_table_8_is_table_1_where_it_prints_the_same_model_and_dagm_is_cut_off() -> None:
    """Table 8 prints no AVERAGE rows; its ViP²-CLIP cells (AUROC, AP / AUROC, PRO) are the same model's Table 1
    values, so each re-derives from Table 1. The DAGM cells are cut off in the paper's text (not transcribed)."""
    table_8 = DATA["full_shot"]
    assert table_8["table"] == "Table 8" and list(table_8["datasets"]) == ["mvtec", "visa", "mpdd", "btad", "dagm"]
    for dataset, blocks in table_8["datasets"].items():
        row = _printed_row(dataset)
        for block, printed in blocks.items():
            if dataset == "dagm":
                assert printed is None
                continue
            assert printed == [row[key] for key in table_8["metrics"][block]], (dataset, block)
    assert "DAGM" in table_8["cut_off"] and "no AVERAGE" in table_8["cut_off"]


def test_table_3_is_ours_at_the_papers_size_and_names_its_device() -> None:
    """Table 3 prints no averages: its trainable parameters re-derive from our count at ViT-L/14@336 (VCA 1,786,752
    + FGP 2,362,369 = 4,149,121, tests/model/test_model.py), and the loader keeps the device it was measured on."""
    table_3 = PAPER.efficiency
    assert table_3["table"] == "Table 3" and table_3["device"] == "NVIDIA L20 GPU (48 GB)"
    assert table_3["trainable_parameters_m"] == round((1_786_752 + 2_362_369) / 1e6, 2)
    assert (table_3["inference_ms"], table_3["inference_ms_spread"], table_3["gpu_memory_gb"]) == (48.69, 0.19, 2.21)
    assert table_3["training_time_h"] == 0.54
