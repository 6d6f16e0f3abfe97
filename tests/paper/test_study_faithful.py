"""`vip2clip study` says what made its numbers and where it chose: Table 4's untrained-CLIP row, Fig. 6 retrained
per K (or swept at test time on request), Fig. 5's two readings, no paper comparison for a run on random weights,
the tiny backbone or data whose classes are not the benchmark's, and the bad inputs of issue 27 refused or named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.paper_numbers import load_paper_numbers
from vip2clip.paper import study as study_module
from vip2clip.paper import study_figure
from vip2clip.paper.comparability import Comparability, compare_run
from vip2clip.paper.studies import STUDIES
from vip2clip.paper.study_report import write_study

pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
MODEL_ARGS = ["--backbone", "tiny", "--image-size", "64", "--no-progress", "--epochs", "1", "--train-batch-size", "4"]
PAPER_TITLE = "“ViP²-CLIP: Visual-Perception Prompting with Unified Alignment for Zero-Shot Anomaly Detection"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """--data for the MVTec AD <-> VisA swap on two small synthetic sets."""
    base = tmp_path_factory.mktemp("faithful")
    sizes = {"classes": 1, "image_size": 48, "n_train_good": 0, "n_test_good": 2, "n_test_defect": 2}
    generate_benchmark(base / "a", seed=1, style="textured", **sizes)
    generate_benchmark(base / "b", seed=2, style="structured", **sizes)
    return ["--data", f"mvtec={base / 'a'}", f"visa={base / 'b'}"]


def test_table_4s_first_row_is_untrained_clip_and_the_run_is_labelled_not_comparable(data, tmp_path: Path) -> None:
    out, cache = tmp_path / "t4", tmp_path / "elsewhere"
    argv = ["study", "modules", *data, "--variants", "none", "--cache-dir", str(cache), "--out", str(out)]
    assert main([*argv, *MODEL_ARGS]) == 0
    assert not (out / "models").exists()  # untrained: no training, no checkpoint
    results = json.loads(next((out / "runs" / "none").rglob("results.json")).read_text())
    assert results["model"]["config"]["text_prompts"] == "handcrafted" and results["training"]["trained"] is False
    assert any(cache.iterdir()) and not (out / "feature_cache").exists()  # --cache-dir is the study's cache
    assert json.loads((out / "study_settings.json").read_text())["settings"]["random_init"] is True
    markdown = (out / "study.md").read_text()
    assert "Not comparable with the paper (random CLIP weights; the tiny test backbone)" in markdown
    assert "ours - paper" not in markdown and "| paper |" not in markdown
    assert "untrained CLIP" in markdown.splitlines()[4]
    assert "are not among the paper's MVTec AD classes" in markdown  # synthetic data named mvtec
    report = json.loads((out / "study.json").read_text())
    assert report["comparability"]["comparable"] is False
    assert report["paper"] == {"table": None, "note": "not comparable: random CLIP weights; the tiny test backbone"}
    assert all(entry["paper"] is None for v in report["variants"] for entry in v["datasets"].values())


def test_a_comparable_run_keeps_the_paper_column_and_names_the_paper_once(tmp_path: Path) -> None:
    study = STUDIES["alignment"]
    results = {v.key: {t: [dict.fromkeys(_keys(), 0.5)] for t in ("mvtec", "visa")} for v in study.variants}
    real = compare_run({"backbone": None, "clip_weights": "ViT-L-14-336px.pt"})
    assert real == Comparability()
    mismatched = compare_run(
        {"clip_weights": "w.pt"}, {"mvtec": ["carpet", "bottle"], "visa": ["gizmo"]}, reference=load_paper_numbers()
    )
    assert mismatched.comparable and set(mismatched.datasets) == {"visa"}
    write_study(
        tmp_path,
        study,
        variants=study.variants,
        seeds=(111,),
        results=results,
        titles=lambda n: n,
        comparison=mismatched,
    )
    markdown = (tmp_path / "study.md").read_text()
    assert f"Paper: Table 5 of {PAPER_TITLE} (anonymous authors)”; ours - paper" in markdown
    assert "Tables 1 and 2, column" not in markdown  # the reference's list of tables is not the paper's title
    assert "No paper comparison on visa: its classes (gizmo)" in markdown
    data = json.loads((tmp_path / "study.json").read_text())["variants"][0]["datasets"]
    assert data["mvtec"]["paper"] is not None and data["visa"]["paper"] is None


def _keys() -> tuple[str, ...]:
    from vip2clip.metrics import METRIC_KEYS

    return METRIC_KEYS


def test_a_figure_on_random_weights_is_not_titled_reproduced(tmp_path: Path, monkeypatch) -> None:
    pyplot = pytest.importorskip("matplotlib.pyplot")
    titles, close = [], pyplot.close
    monkeypatch.setattr(pyplot, "close", lambda figure: (titles.append(figure.axes[0].get_title()), close(figure)))
    study = STUDIES["top-k"]
    results = {v.key: {"visa": [dict.fromkeys(_keys(), 0.5)]} for v in study.variants}
    label = compare_run({"backbone": "tiny", "clip_weights": None}).label()
    study_figure.write_figure(
        tmp_path, study, variants=study.variants, results=results, titles=str, not_comparable=label
    )
    assert "reproduced" not in titles[0] and "not comparable: random CLIP weights" in titles[0]


@pytest.mark.slow
def test_fig_6_trains_one_model_per_k_unless_swept_at_test_time(data, tmp_path: Path) -> None:
    argv = ["study", "top-k", "--train", data[1], "--test", data[2], "--variants", "k1,k10", *MODEL_ARGS]
    assert main([*argv, "--out", str(tmp_path / "per-k")]) == 0
    assert sorted(p.name for p in (tmp_path / "per-k" / "models").iterdir()) == ["k1", "k10"]
    assert "one model trained per K" in (tmp_path / "per-k" / "study.md").read_text()
    assert main([*argv, "--top-k-at-test", "--out", str(tmp_path / "sweep")]) == 0
    assert [p.name[:7] for p in (tmp_path / "sweep" / "models").iterdir()] == ["shared-"]
    assert "test-time sweep" in (tmp_path / "sweep" / "study.md").read_text()


def test_fig_5_has_both_readings_of_static_prompts() -> None:
    study = STUDIES["static-prompts"]
    static = {v.key: (dict(v.options), v.label) for v in study.variants}
    assert static["static"][0] == {"use_vca": False} and "FGP kept" in static["static"][1]
    assert static["static-no-fgp"][0] == {"use_vca": False, "use_fgp": False} and "no FGP" in static["static-no-fgp"][1]
    assert study.variants[-1].key == "visual"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["top-k", "--variants", "k1,k20"], "Top-K larger than the 16 patches of a 64-px image"),
        (["modules", "--variants", ""], "names no variant"),
        (["modules", "--variants", " , "], "names no variant"),
        (["modules", "--seeds", "1", str(2**64)], "outside 0..9223372036854775807"),
        (["modules", "--top-k-at-test"], "is an option of the top-k study"),
    ],
)
def test_bad_study_options_are_refused_before_any_model(extra, message, data, tmp_path: Path, capsys) -> None:
    assert main(["study", extra[0], *data, *extra[1:], "--out", str(tmp_path / "x"), *MODEL_ARGS]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "study_settings.json").exists()  # refused before the study claimed the folder


def test_an_unused_data_entry_is_named(data, tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(study_module, "run_study", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with caplog.at_level(logging.WARNING):
        main(["study", "alignment", *data, f"mpdd={data[1].split('=')[1]}", "--out", str(tmp_path / "x"), *MODEL_ARGS])
    assert "--data mpdd: not used by this study" in caplog.text


def test_damaged_done_and_settings_files_are_named_and_a_damaged_unit_runs_again(tmp_path: Path, caplog) -> None:
    settings = tmp_path / "study" / "study_settings.json"
    settings.parent.mkdir()
    settings.write_text('{"study": "modu')  # cut off
    with pytest.raises(ValueError, match=r"study_settings\.json is empty or damaged"):
        study_module.claim_folder(settings.parent, {"study": "modules", "settings": {}}, overwrite=False)
    study_module.claim_folder(settings.parent, {"study": "modules", "settings": {}}, overwrite=True)
    study = STUDIES["alignment"]
    variant, direction = study.variants[0], study.protocol[0]
    done = tmp_path / "done.json"
    record = {**study_module._unit_record(variant, direction), "seed": 1, "datasets": {"visa": {"image_auroc": 0.5}}}
    for text in ("", '{"variant": "dual", "data', "{}", json.dumps({**record, "options": {}})):
        done.write_text(text)
        with caplog.at_level(logging.WARNING):
            assert study_module.read_done(done, variant, direction=direction) is None
        assert str(done) in caplog.text
        caplog.clear()
    done.write_text(json.dumps(record))
    assert study_module.read_done(done, variant, direction=direction) == record["datasets"]


def test_an_empty_class_is_named_under_the_table(tmp_path: Path) -> None:
    from vip2clip.cli.study_checks import report_context
    from vip2clip.data.index import read_index

    root = tmp_path / "set"
    generate_benchmark(root, seed=1, classes=2, image_size=32, n_test_good=1, n_test_defect=1)
    meta = json.loads((root / "meta.json").read_text())
    empty = sorted(meta["test"])[1]
    meta["test"][empty] = []
    (root / "meta.json").write_text(json.dumps(meta))
    index = read_index(root)
    _, notes = report_context({"clip_weights": None}, STUDIES["alignment"], indexes={"mvtec": index, "visa": index})
    assert notes == [
        f"visa: class(es) {empty} have no test image: not in the table, its means or the paper's comparison",
        f"mvtec: class(es) {empty} have no test image: not in the table, its means or the paper's comparison",
    ]
    results = {v.key: {"visa": [dict.fromkeys(_keys(), 0.5)]} for v in STUDIES["alignment"].variants}
    write_study(
        tmp_path,
        STUDIES["alignment"],
        variants=STUDIES["alignment"].variants,
        seeds=(1,),
        results=results,
        titles=str,
        notes=notes,
    )
    assert f"Note: visa: class(es) {empty} have no test image" in (tmp_path / "study.md").read_text()
