"""Evaluation panels: drawn after the last class at the dataset's thresholds, the predicted mask where there is no
ground truth, no temporary files left behind."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation import panels as panels_module
from vip2clip.evaluation.evaluate import evaluate
from vip2clip.evaluation.panels import PanelSpool, panel_order
from vip2clip.evaluation.results import ClassBatch, EvalConfig
from vip2clip.metrics import UndefinedMetricWarning
from vip2clip.visualization.panel import GROUND_TRUTH, PREDICTED_MASK, PanelStyle, layout_panel


@pytest.fixture
def drawn(monkeypatch) -> list[dict]:
    """Records the arguments and the file of every panel written (the real functions still draw and write it)."""
    calls: list[dict] = []
    make, save = panels_module.make_panel, panels_module.atomic_save_image

    def recording_make(image, anomaly_map, *, mask, mask_title, text, style):
        calls.append({"mask": mask, "mask_title": mask_title, "text": text, "style": style})
        return make(image, anomaly_map, mask=mask, mask_title=mask_title, text=text, style=style)

    def recording_save(image, path):
        calls[-1]["path"] = Path(path)
        return save(image, path)

    monkeypatch.setattr(panels_module, "make_panel", recording_make)
    monkeypatch.setattr(panels_module, "atomic_save_image", recording_save)
    return calls


def _hidden_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".")]


def test_panel_order_alternates_anomalous_and_normal() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert panel_order(labels, None).tolist() == [3, 0, 4, 1, 2]
    assert panel_order(labels, 3).tolist() == [3, 0, 4]


def test_panels_show_the_dataset_thresholds(tiny_model, tmp_path: Path, drawn: list[dict]) -> None:
    bench = generate_benchmark(tmp_path / "data", classes=2, seed=3, image_size=48, n_train_good=0, n_test_good=2,
                               n_test_defect=2)  # fmt: skip
    maps = tmp_path / "maps"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # an untrained model may give flat maps
        result = evaluate(tiny_model, bench, config=EvalConfig(batch_size=3, panels_dir=maps, max_panels=3))
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert len(written) == 6 and {name.split("/")[0] for name in written} == {"texture_0", "texture_1"}
    assert sorted(c["path"].relative_to(maps).as_posix() for c in drawn) == written
    # Both classes are drawn at the thresholds of the whole dataset (calibration.json's), known only at the end.
    assert not math.isnan(result.image_threshold)
    for call in drawn:
        assert call["text"].image_threshold == result.image_threshold
        assert call["text"].pixel_threshold == result.pixel_threshold
        assert call["text"].threshold_source == "F1-optimal" and call["mask_title"] == GROUND_TRUTH
    assert [("anomalous" in c["text"].caption) for c in drawn[:3]] == [True, False, True]  # alternating
    size = Image.open(drawn[0]["path"]).size
    assert size == layout_panel((48, 48), 3, style=PanelStyle(max_side=256)).size  # 64-px maps drawn on 256-px tiles
    assert not _hidden_files(maps)  # the spooled maps went with the run


def _one_class(tmp_path: Path) -> AnomalyDataset:
    index = generate_benchmark(tmp_path / "data", classes=1, seed=5, image_size=48, n_train_good=0, n_test_good=1,
                               n_test_defect=1)  # fmt: skip
    return AnomalyDataset(index, "test", classes=None, image_size=64)


def _outputs(dataset: AnomalyDataset, pixel_rows: list[bool]) -> ClassBatch:
    """Outputs with a map that is hot (0.8) on the left half and calm (0.1) on the right, for every image."""
    n = len(dataset)
    maps = np.full((n, 64, 64), 0.1, dtype=np.float16)
    maps[:, :, :32] = 0.8
    return ClassBatch(
        pred_score=np.linspace(0.2, 0.9, n, dtype=np.float32),
        gt_label=np.array(dataset.labels),
        anomaly_map=maps,
        gt_mask=np.zeros((n, 64, 64), dtype=bool),
        pixel_rows=np.array(pixel_rows),
        positions=np.arange(n),
    )


def test_without_ground_truth_the_third_tile_is_the_predicted_mask(tmp_path: Path, drawn: list[dict]) -> None:
    dataset = _one_class(tmp_path)
    spool = PanelSpool(tmp_path / "maps")
    spool.add(dataset, _outputs(dataset, [False] * len(dataset)))  # like HeadCT: no masks at all
    assert spool.write(0.5, 0.5, model_size=64) == 2
    assert all(c["mask_title"] == PREDICTED_MASK for c in drawn)
    panel = Image.open(drawn[0]["path"]).convert("RGB")
    layout = layout_panel((48, 48), 3, style=drawn[0]["style"])  # the synthetic images are 48 px
    tile = np.asarray(panel.crop(layout.tiles[2]))
    half = tile.shape[1] // 2
    assert (tile[:, : half - 2] == 255).all() and (tile[:, half + 2 :] == 0).all()  # map >= 0.5 on the left only
    assert not _hidden_files(tmp_path / "maps")


def test_without_any_pixel_threshold_the_third_tile_is_empty(tmp_path: Path, drawn: list[dict]) -> None:
    dataset = _one_class(tmp_path)
    spool = PanelSpool(tmp_path / "maps", limit=1)
    spool.add(dataset, _outputs(dataset, [False] * len(dataset)))
    assert spool.write(0.5, math.nan, model_size=64) == 1
    assert drawn[0]["mask"] is None and drawn[0]["text"].pixel_threshold is None
    assert drawn[0]["text"].image_threshold == 0.5
