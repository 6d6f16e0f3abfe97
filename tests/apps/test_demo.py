"""`vip2clip demo`: the README's main command, as a real process, plus its folder rules in-process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vip2clip.apps.demo import DemoConfig, run_offline_demo, scaled_top_k
from vip2clip.cli import main
from vip2clip.metrics import UndefinedMetricWarning

TINY_DEMO = DemoConfig(image_size=64, data_size=48, classes=1, train_good=2, train_defect=2, test_good=2,
                       test_defect=2, epochs=1, panels_per_class=2)  # fmt: skip


@pytest.mark.slow
def test_demo_command_writes_table_and_panels(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, "-m", "vip2clip", "demo", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    seconds = time.perf_counter() - started
    assert process.returncode == 0, process.stderr[-3000:]
    print(f"vip2clip demo took {seconds:.0f} s")  # the figure quoted in the README; shown with pytest -s
    stdout = process.stdout
    assert "TINY, RANDOMLY INITIALISED CLIP" in stdout and "say NOTHING" in stdout
    assert "FGP learning rate raised" in stdout and "| **Mean** |" in stdout
    for name in ("results.md", "results.csv", "results.json", "calibration.json", "train/checkpoint.pt"):
        assert (out / name).is_file(), name
    assert str(out / "results.md") in stdout and str(out / "maps") in stdout  # it says where the results are
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "RANDOM weights" in table and "FGP learning rate raised" in table  # the file carries the caveats too
    panels = sorted((out / "maps").rglob("*.png"))
    assert len(panels) == 6  # 3 per class, 2 classes
    with (out / "results.csv").open(newline="") as stream:
        mean = next(row for row in csv.DictReader(stream) if row["class"] == "mean")
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["backbone"] == "tiny" and results["model"]["top_k"] == scaled_top_k(128, 16)
    # Bright synthetic defects are learnable even by a random tiny CLIP (see the demo's notes); well above chance.
    assert float(mean["pixel_auroc"]) > 0.7
    marker = json.loads((out / "demo.json").read_text())
    assert marker["status"] == "done" and len(marker["training"]) == DemoConfig().epochs


@pytest.mark.slow  # two short demo runs: ~10 s on a loaded machine
@pytest.mark.filterwarnings("ignore", category=UndefinedMetricWarning)
def test_demo_folder_rules(tmp_path: Path) -> None:
    lines: list[str] = []
    first = run_offline_demo(tmp_path / "d", config=TINY_DEMO, echo=lines.append)
    assert first.checkpoint.is_file() and len(first.panels) == 2
    assert any("RANDOMLY INITIALISED" in line for line in lines)
    run_offline_demo(tmp_path / "d", config=TINY_DEMO, echo=lines.append)  # a previous demo folder is reused
    log = (tmp_path / "d/train/train_log.jsonl").read_text().splitlines()
    assert len(log) == 1  # the second run trained afresh instead of appending to the first run's log
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a vip2clip demo folder"):
        run_offline_demo(tmp_path / "other", config=TINY_DEMO, echo=lines.append)


def test_real_backbone_needs_weights(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "--backbone", "ViT-L-14-336"]) == 2
    assert "needs CLIP weights" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_scaled_top_k_keeps_the_release_share() -> None:
    assert scaled_top_k(518, 14) == 50  # the release: 50 of 37x37 patches
    assert scaled_top_k(128, 16) == 2 and scaled_top_k(32, 16) == 1


def test_a_demo_that_stops_on_an_error_says_failed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "demo.json").write_text('{"status": "done"}')  # an earlier demo folder, reused ...
    (out / "data").write_text("in the way")  # ... where the data folder cannot be created
    assert main(["demo", "--out", str(out), "--image-size", "64", "--epochs", "1"]) == 2
    assert "vip2clip demo: error:" in capsys.readouterr().err
    marker = json.loads((out / "demo.json").read_text())
    assert marker["status"] == "failed" and marker["error"].startswith(("FileExistsError", "NotADirectoryError"))
