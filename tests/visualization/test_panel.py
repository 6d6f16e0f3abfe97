"""Pictures: the fixed colour scale, labelled panels (titles, colour bar, score and decision) and their text."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont, features

from vip2clip.visualization import text as text_module
from vip2clip.visualization.heatmap import MAP_HIGH, MAP_LOW, heatmap_overlay, jet, normalize_map
from vip2clip.visualization.panel import (
    ANOMALOUS_COLOUR,
    GROUND_TRUTH,
    NEUTRAL_COLOUR,
    NORMAL_COLOUR,
    PREDICTED_MASK,
    PanelStyle,
    PanelText,
    decision_line,
    layout_panel,
    make_panel,
    panel_lines,
    tile_size,
)
from vip2clip.visualization.text import fitted_text_image, text_image

GREY = np.full((48, 48, 3), 128, dtype=np.uint8)
TEXT = PanelText(
    pred_score=0.8,
    image_threshold=0.5,
    threshold_source="F1-optimal",
    pixel_threshold=0.4,
    caption="bottle / crack / 000.png (truth: anomalous)",
)


def _crop(panel: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(panel.crop(box)).astype(int)


def _is_blank(region: np.ndarray) -> bool:
    return bool((region == 255).all())


def test_heatmap_colours_and_overlay_size() -> None:
    ramp = jet(np.linspace(0.0, 1.0, 11)[None])[0].astype(int)
    assert tuple(ramp[0]) == (0, 0, 128) and tuple(ramp[-1]) == (128, 0, 0)  # dark blue -> dark red
    assert ramp[:, 2].argmax() < ramp[:, 1].argmax() < ramp[:, 0].argmax()  # blue, then green, then red peak
    image = np.full((30, 40, 3), 200, dtype=np.uint8)
    overlay = heatmap_overlay(image, np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), alpha=1.0)
    assert overlay.size == (40, 30)  # the map is resized to the image
    pixels = np.asarray(overlay)
    assert pixels[0, 0, 2] > pixels[0, 0, 0] and pixels[-1, -1, 0] > pixels[-1, -1, 2]  # low blue, high red
    with pytest.raises(ValueError, match="low < high"):
        normalize_map(np.zeros((2, 2)), low=0.5, high=0.5)


def test_a_calm_map_stays_cold_whatever_its_own_range() -> None:
    """A near-constant low map (a defect-free part) must not be stretched to the full colour range."""
    calm = 0.05 + 0.02 * np.random.default_rng(0).random((48, 48), dtype=np.float32)
    colours = np.asarray(heatmap_overlay(GREY, calm, alpha=1.0)).astype(int)
    assert (colours[..., 2] > colours[..., 0]).all() and colours[..., 0].max() == 0  # all blue, no red at all
    np.testing.assert_array_equal(normalize_map(calm), np.clip(calm, MAP_LOW, MAP_HIGH))


def test_the_same_value_gets_the_same_colour_in_every_panel_of_a_run() -> None:
    """Two maps with different ranges (0.5..0.55 and 0..1): where both are 0.5 the panels show the same colour."""
    narrow = np.full((48, 48), 0.55, dtype=np.float32)
    wide = np.tile(np.linspace(0.0, 1.0, 48, dtype=np.float32), (48, 1))
    narrow[:, 20:28] = wide[:, 20:28] = 0.5
    layout = layout_panel((48, 48), len(panel_lines(TEXT)))
    tiles = [_crop(make_panel(GREY, m, text=TEXT), layout.tiles[1]) for m in (narrow, wide)]
    middle = tiles[0].shape[1] // 2  # tile column 24 of 48 after resizing, inside the 0.5 band of both
    np.testing.assert_array_equal(tiles[0][:, middle], tiles[1][:, middle])
    expected = np.rint(0.5 * 128 + 0.5 * jet(np.array([[0.5]]))[0, 0]).astype(int)
    assert np.abs(tiles[0][10, middle] - expected).max() <= 1
    assert not np.array_equal(tiles[0][:, 2], tiles[1][:, 2])  # where the maps differ, the colours differ


def test_panel_has_titles_a_colour_bar_and_text_lines() -> None:
    panel = make_panel(GREY, np.zeros((48, 48), dtype=np.float32), mask=np.zeros((48, 48), bool), text=TEXT)
    layout = layout_panel((48, 48), 3)
    tile_w, tile_h = tile_size((48, 48))
    assert (tile_w, tile_h) == (256, 256)  # small images are enlarged so that text fits
    assert panel.size == layout.size
    style = PanelStyle()
    assert panel.width >= 3 * tile_w + 2 * style.gap + (layout.bar[2] - layout.bar[0]) + 20  # bar and its numbers
    assert panel.height >= tile_h + 4 * text_image("Hg", layout.font_size).height  # a title row and 3 lines
    for box in (*layout.titles, *layout.lines):
        assert not _is_blank(_crop(panel, box)), box  # text is drawn there
    numbers = _crop(panel, (layout.labels_left, layout.bar[1], panel.width, layout.bar[3]))
    assert not _is_blank(numbers[:20]) and not _is_blank(numbers[-20:])  # tick labels at both ends
    bar = _crop(panel, layout.bar)[:, (layout.bar[2] - layout.bar[0]) // 2]  # one column, top to bottom
    ramp = jet(np.linspace(1.0, 0.0, bar.shape[0])[:, None])[:, 0].astype(int)
    marker = np.abs(np.arange(bar.shape[0]) - 0.6 * (bar.shape[0] - 1)).argmin()  # the pixel threshold 0.4
    assert (bar[marker] == 0).all()  # black line
    keep = np.abs(np.arange(bar.shape[0]) - marker) > 2
    np.testing.assert_array_equal(bar[keep], ramp[keep])  # high end at the top, low end at the bottom
    assert tuple(bar[0]) == tuple(jet(np.array([[1.0]]))[0, 0]) and tuple(bar[-1]) == (0, 0, 128)


def test_mask_titles_and_empty_mask_tile() -> None:
    layout = layout_panel((48, 48), 3)
    mask = np.zeros((48, 48), bool)
    truth, predicted = (
        make_panel(GREY, mask, mask=mask, mask_title=title, text=TEXT) for title in (GROUND_TRUTH, PREDICTED_MASK)
    )
    assert not np.array_equal(_crop(truth, layout.titles[2]), _crop(predicted, layout.titles[2]))
    assert np.array_equal(_crop(truth, layout.tiles[2]), _crop(predicted, layout.tiles[2]))
    empty = _crop(make_panel(GREY, mask, mask=None, text=TEXT), layout.tiles[2])
    assert (empty == empty[0, 0]).all() and 0 < empty[0, 0, 0] < 255  # grey, neither black (no defect) nor white


@pytest.mark.parametrize(
    ("text", "words", "colour"),
    [
        (
            PanelText(pred_score=0.8, image_threshold=0.5, threshold_source="F1-optimal"),
            ("0.800 >= 0.500", "F1-optimal", "ANOMALOUS"),
            ANOMALOUS_COLOUR,
        ),
        (
            PanelText(pred_score=0.5, image_threshold=0.5, threshold_source="calibration"),
            (">= 0.500", "ANOMALOUS"),
            ANOMALOUS_COLOUR,
        ),  # as predict decides
        (
            PanelText(pred_score=0.2, image_threshold=0.5, threshold_source="F1-optimal"),
            ("0.200 < 0.500", "normal"),
            NORMAL_COLOUR,
        ),
        (PanelText(pred_score=0.8, image_threshold=None), ("0.800", "uncalibrated", "no decision"), NEUTRAL_COLOUR),
        (
            PanelText(pred_score=0.8, image_threshold=float("nan"), threshold_source="F1-optimal"),
            ("uncalibrated",),
            NEUTRAL_COLOUR,
        ),
        (
            PanelText(pred_score=0.8, image_threshold=0.5, threshold_source=""),
            ("uncalibrated", "anomalous at the default 0.500"),
            NEUTRAL_COLOUR,
        ),
    ],
)
def test_decision_line(text: PanelText, words: tuple[str, ...], colour: tuple[int, int, int]) -> None:
    line, drawn = decision_line(text)
    assert all(word in line for word in words), line
    assert drawn == colour


def test_text_lines_are_drawn_in_their_colours() -> None:
    layout = layout_panel((48, 48), 3)
    for score, channel in ((0.9, 0), (0.1, 1)):  # anomalous: red text; normal: green text
        panel = make_panel(
            GREY,
            np.zeros((48, 48)),
            mask=None,
            text=PanelText(pred_score=score, image_threshold=0.5, threshold_source="F1-optimal", caption="x"),
        )
        line = _crop(panel, layout.lines[1])
        ink = line[(line != 255).any(axis=-1)]
        assert ink[:, channel].mean() > ink[:, 1 - channel].mean() + 40
    lines = [
        line
        for line, _ in panel_lines(
            PanelText(pred_score=0.9, image_threshold=0.5, threshold_source="F1-optimal", pixel_threshold=0.3)
        )
    ]
    assert lines[-1].endswith("pixel threshold 0.300") and "fixed 0.00-1.00" in lines[-1]


def test_tiles_keep_the_aspect_and_stay_within_the_style_range() -> None:
    assert tile_size((4000, 3000)) == (640, 480)
    assert tile_size((25, 100)) == (64, 256) and tile_size((100, 400)) == (100, 400)
    assert tile_size((300, 200), PanelStyle(max_side=518)) == (300, 200)
    wide = make_panel(np.zeros((30, 90, 3), np.uint8), np.zeros((10, 10)), text=TEXT)
    assert wide.size == layout_panel((90, 30), 3).size
    with pytest.raises(ValueError, match="min_side"):
        PanelStyle(min_side=300, max_side=200)


def test_long_text_is_fitted_and_non_ascii_is_replaced() -> None:
    long = "a very long caption " * 10
    assert fitted_text_image(long, 16, max_width=200).width <= 200
    assert text_image("défaut", 16).size == text_image("d?faut", 16).size


def test_without_freetype_text_falls_back_to_an_enlarged_bitmap_font(monkeypatch) -> None:
    original = ImageFont.load_default

    def no_freetype(size=None):
        if size is not None:
            raise ImportError("The _imagingft C module is not installed")
        return original()

    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    text_module._font.cache_clear()
    try:
        assert not text_module.scalable_text()
        small, large = text_image("score 0.873", 11), text_image("score 0.873", 26)
        assert large.height >= 2 * small.height - 1 and large.width >= 2 * small.width - 1
        assert (np.asarray(large) == 0).any()  # black text was drawn
        panel = make_panel(GREY, np.zeros((48, 48)), text=TEXT)
        assert panel.size == layout_panel((48, 48), 3).size
    finally:
        monkeypatch.undo()
        text_module._font.cache_clear()
    assert text_module.scalable_text() == features.check("freetype2")


def test_every_tile_is_framed_so_an_all_white_mask_stays_visible() -> None:
    """Issue 17 item 15: an all-white predicted mask merged into the white panel background."""
    from vip2clip.visualization.panel import TILE_FRAME, PanelStyle, layout_panel

    image = np.full((40, 40, 3), 90, np.uint8)
    panel = make_panel(image, np.zeros((40, 40), np.float32), mask=np.ones((40, 40), bool), mask_title=PREDICTED_MASK)
    layout = layout_panel((40, 40), 1, style=PanelStyle())
    pixels = np.asarray(panel)
    for left, top, right, bottom in layout.tiles:
        middle = (top + bottom) // 2
        assert tuple(pixels[middle, left - 1]) == TILE_FRAME and tuple(pixels[middle, right]) == TILE_FRAME
        assert tuple(pixels[top - 1, (left + right) // 2]) == TILE_FRAME
    left, top, right, bottom = layout.tiles[2]
    assert (pixels[top:bottom, left:right] == 255).all()  # the mask itself is unchanged: all white
