"""A study's tables: the paper column is paper_results.json's number, the difference is ours - paper, the
registry's variants are the paper's, seeds give mean ± std, and the figures are drawn (no training here)."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest

from vip2clip.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS
from vip2clip.model.presets import get_preset
from vip2clip.paper.studies import STUDIES
from vip2clip.paper.study_report import write_study

PAPER = json.loads(resources.files("vip2clip.evaluation").joinpath("paper_results.json").read_text(encoding="utf-8"))
BLOCK_KEYS = {"image": ("image_auroc", "image_ap", "image_f1"), "pixel": ("pixel_auroc", "pixel_aupro", "pixel_f1")}


def _fake_results(study, seeds: int = 1) -> dict:
    """Made-up means per variant and test set (distinct per cell), one dict per seed."""
    results = {}
    for v, variant in enumerate(study.variants):
        tests = [test for direction in study.protocol for test in direction.tests]
        results[variant.key] = {
            test: [{key: 0.5 + 0.01 * v + 0.001 * t + 0.0001 * k + 0.02 * s for k, key in enumerate(METRIC_KEYS)}
                   for s in range(seeds)]
            for t, test in enumerate(tests)
        }  # fmt: skip
    return results


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


@pytest.mark.parametrize(
    "name", [name for name, s in STUDIES.items() if s.reproduces.startswith("Table") and s.rows != "tables"]
)  # Tables 1-2 (`study main`) are the paper's rows, not a study of its "studies"
def test_the_registry_has_the_papers_variants_and_options(name: str) -> None:
    paper = PAPER["studies"][name]
    assert paper["table"] == STUDIES[name].reproduces
    ours = {variant.key: variant.preset for variant in STUDIES[name].variants}
    extra = {"none-trained": "ablation-none"} if name == "modules" else {}  # our second row, not the paper's
    assert ours == {**{variant["key"]: variant["preset"] for variant in paper["variants"]}, **extra}
    for variant in STUDIES[name].variants:  # the options a study trains with are its preset's
        assert dict(variant.options) == get_preset(variant.preset).config


@pytest.mark.parametrize("name", ["modules", "alignment", "state-words"])
def test_the_paper_column_equals_paper_results_json(name: str, tmp_path: Path) -> None:
    study = STUDIES[name]
    write_study(
        tmp_path, study, variants=study.variants, seeds=(111,), results=_fake_results(study), titles=lambda n: n
    )
    rows = _rows((tmp_path / "study.md").read_text())
    header = rows[0]
    data = json.loads((tmp_path / "study.json").read_text())
    by_key = dict(zip((v.key for v in study.variants), rows[2:], strict=True))
    for key in set(by_key) - {v["key"] for v in PAPER["studies"][name]["variants"]}:  # our rows the paper lacks
        assert all(cell == "-" for cell in by_key[key][2::3] + by_key[key][3::3])
    for variant in PAPER["studies"][name]["variants"]:
        row = by_key[variant["key"]]
        ours = next(v for v in data["variants"] if v["key"] == variant["key"])
        for dataset, blocks in variant["values"].items():
            for block, printed in blocks.items():
                column = header.index(
                    f"{dataset} {block} ({'AUROC, PRO, F1' if block == 'pixel' else 'AUROC, AP, F1'})"
                )
                assert row[column + 1] == "(" + ", ".join(f"{value:.1f}" for value in printed) + ")"
                for key, value in zip(BLOCK_KEYS[block], printed, strict=True):
                    assert ours["datasets"][dataset]["paper"][key] == pytest.approx(value / 100, abs=1e-9)
                    mean = ours["datasets"][dataset]["metrics"][key]["mean"]
                    assert ours["datasets"][dataset]["difference"][key] == pytest.approx(mean - value / 100)
                ours_cell = [float(x) for x in row[column].strip("()").split(", ")]
                difference = [float(x) for x in row[column + 2].strip("()").split(", ")]
                assert difference == [pytest.approx(o - p, abs=0.051) for o, p in zip(ours_cell, printed, strict=True)]


def test_the_medical_table_has_the_papers_rows_and_average(tmp_path: Path) -> None:
    study = STUDIES["medical"]
    results = _fake_results(study)
    for test, runs in results["fine-tuned"].items():  # as the real sets: image labels only or masks only
        undefined = PIXEL_KEYS if test in ("headct", "brainmri", "br35h") else IMAGE_KEYS
        for run in runs:
            run.update(dict.fromkeys(undefined, math.nan))
    write_study(tmp_path, study, variants=study.variants, seeds=(111,), results=results, titles=lambda n: n)
    rows = _rows((tmp_path / "study.md").read_text())
    paper = PAPER["studies"]["medical"]
    values = paper["variants"][0]["values"]
    pixel_start = next(i for i, row in enumerate(rows) if row[0].startswith("Pixel-level"))
    image_rows = rows[2:pixel_start]
    assert [row[1] for row in image_rows][:3] == ["headct", "brainmri", "br35h"]  # the paper's order
    for row in image_rows[:3]:
        assert row[3] == "(" + ", ".join(f"{v:.1f}" for v in values[row[1]]["image"]) + ")"
    for row in rows[pixel_start:]:
        if row[1] in ("isic", "colondb", "clinicdb", "endo", "kvasir"):
            assert row[3] == "(" + ", ".join(f"{v:.1f}" for v in values[row[1]]["pixel"]) + ")"
    averages = [row for row in rows if row[1] == "AVERAGE"]
    for average, block in zip(averages, ("image", "pixel"), strict=True):  # the printed AVERAGE rows
        assert average[3] == "(" + ", ".join(f"{v:.1f}" for v in paper["average"][block]) + ")"


def test_several_seeds_give_mean_and_standard_deviation(tmp_path: Path) -> None:
    study = STUDIES["alignment"]
    write_study(
        tmp_path,
        study,
        variants=study.variants,
        seeds=(1, 2, 3),
        results=_fake_results(study, seeds=3),
        titles=lambda n: n,
    )
    data = json.loads((tmp_path / "study.json").read_text())
    cell = data["variants"][0]["datasets"]["visa"]["metrics"]["image_auroc"]
    assert cell["mean"] == pytest.approx(0.5 + 0.02) and cell["std"] == pytest.approx(0.02)
    assert "52.0 ± 2.0" in (tmp_path / "study.md").read_text()


@pytest.mark.parametrize("name", ["static-prompts", "top-k", "prompt-length"])
def test_figure_studies_draw_ours_and_say_the_paper_prints_no_numbers(name: str, tmp_path: Path) -> None:
    study = STUDIES[name]
    written = write_study(
        tmp_path, study, variants=study.variants, seeds=(111,), results=_fake_results(study), titles=lambda n: n
    )
    assert Path(written["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "figure.csv").read_text().splitlines()
    assert lines[0] == "series,dataset,metric,variant,x,mean,std" and len(lines) > 2
    assert "its text does not print: this study shows ours only" in (tmp_path / "study.md").read_text()
    assert "paper" not in _rows((tmp_path / "study.md").read_text())[0]
    if name == "static-prompts":  # the gain of the full model over each reading of "static", in points
        gains = {line.split(",")[0]: line.split(",") for line in lines[1:] if ",visa,image_f1," in line}
        assert set(gains) == {"visual - static", "visual - static-no-fgp"}
        assert float(gains["visual - static"][5]) == pytest.approx(2.0)  # the fake results: 1 point per variant
        assert float(gains["visual - static-no-fgp"][5]) == pytest.approx(1.0)
        assert math.isclose(float(gains["visual - static"][6]), 0.0)
