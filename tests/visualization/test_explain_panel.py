"""Explanation panels: the layout of Fig. 7 / Fig. 3 for one image, and writing them for files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.model.explain import Explanation
from vip2clip.runs.explain_run import Decision, ExplainItem, write_explanations
from vip2clip.visualization.explain_panel import EXPLAIN_STYLE, make_explanation_panel
from vip2clip.visualization.panel import PanelText


def _explanation(attention: bool) -> Explanation:
    """One 32x32 image, 2 layers: layer 6 says 0 everywhere, layer 12 says 1; the prompts look at one patch each."""
    layer_maps = np.stack([np.zeros((32, 32)), np.ones((32, 32))])[None].astype(np.float32)
    weights = np.zeros((1, 2, 2, 2, 2), np.float32)
    weights[0, :, 0, 0, 0] = 1.0  # normal prompt: top-left patch
    weights[0, :, 1, 1, 1] = 1.0  # anomalous prompt: bottom-right patch
    fused = layer_maps.mean(axis=1)
    return Explanation(
        pred_score=np.array([0.7], np.float32),
        anomaly_map=fused,
        fused_map=fused,
        layer_maps=layer_maps,
        smoothed_layer_maps=layer_maps,
        attention=weights if attention else None,
        layers=(6, 12),
        grid=(2, 2),
    )


def _first_row_tile_colour(panel: Image.Image, column: int, tile: int) -> np.ndarray:
    """Mean colour at the centre of the first row's tile in `column` (tiles `tile` px wide, `gap` apart)."""
    pixels = np.asarray(panel, dtype=np.float32)
    x = EXPLAIN_STYLE.gap + column * (tile + EXPLAIN_STYLE.gap) + tile // 2
    top = next(y for y in range(pixels.shape[0]) if (pixels[y, x] != 255).any() and (pixels[y + 20, x] != 255).any())
    y = top + tile // 2
    return pixels[y - 5 : y + 5, x - 5 : x + 5].reshape(-1, 3).mean(axis=0)


def test_panel_rows_and_colours() -> None:
    image = np.full((32, 32, 3), 128, np.uint8)
    panel = make_explanation_panel(
        image,
        _explanation(True),
        index=0,
        mask=np.ones((32, 32), bool),
        text=PanelText(pred_score=0.7, image_threshold=0.5, threshold_source="given"),
    )
    tile = EXPLAIN_STYLE.min_side  # a 32-px image is enlarged to the minimum side
    blue_layer, red_layer = _first_row_tile_colour(panel, 1, tile), _first_row_tile_colour(panel, 2, tile)
    assert blue_layer[2] > blue_layer[0] and red_layer[0] > red_layer[2]  # layer 6 cold, layer 12 hot
    without = make_explanation_panel(image, _explanation(False))
    assert without.width < panel.width and without.height < panel.height  # no truth tile, no attention rows
    pixels = np.asarray(panel, dtype=np.float32)
    bottom_right = pixels[: pixels.shape[0] * 3 // 4, EXPLAIN_STYLE.gap + tile + EXPLAIN_STYLE.gap :]
    assert (bottom_right[..., 0] - bottom_right[..., 2] > 100).any()  # the attended patches are drawn hot


def test_write_explanations_skips_unreadable_files(tiny_model, tmp_path: Path, caplog) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = [ExplainItem(broken, "explain/broken.png"), ExplainItem(good, "explain/a/good.png", "good.png")]
    with caplog.at_level(logging.WARNING):
        out_dir, decision = tmp_path / "out", Decision(0.5, "given")
        written = write_explanations(tiny_model, items, out_dir=out_dir, decision=decision, batch_size=1)
    assert written == 1 and (tmp_path / "out/explain/a/good.png").is_file()
    assert not (tmp_path / "out/explain/broken.png").exists() and "broken.png" in caplog.text
