"""Panels people can read: input | anomaly map | mask, with titles, a colour bar, the score and the decision.

    +---------+ +-------------+ +--------------+
    |  input  | | anomaly map | | ground truth |        (titles)
    |         | |             | |              | ##  1.00
    |  tile   | |    tile     | |     tile     | ##  0.50  (colour bar on the fixed scale, see heatmap.py)
    |         | |             | |              | ##  0.00
    +---------+ +-------------+ +--------------+
    bottle / broken_large / 000.png (truth: anomalous)                       (caption)
    image score 0.873 >= 0.512 (F1-optimal): ANOMALOUS                      (decision)
    colours: anomalous probability per pixel, fixed 0.00-1.00; ...          (scale)

Tiles keep the image's aspect ratio; small images are enlarged to `PanelStyle.min_side` and large ones reduced
to `max_side` (a panel is a preview: `predict` keeps full-size overlays), and the font follows the tile size, so
the text stays legible at any image size. The third tile is the ground truth where there is one, else the mask
the model predicts at the pixel threshold ("mask (prediction)"), else an empty "no mask" tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vip2clip.data.transforms import resize_map
from vip2clip.visualization.heatmap import MAP_HIGH, MAP_LOW, as_rgb_array, heatmap_overlay, jet, normalize_map
from vip2clip.visualization.text import Colour, fitted_text_image, text_image

GROUND_TRUTH, PREDICTED_MASK, NO_MASK = "ground truth", "mask (prediction)", "no mask"
ANOMALOUS_COLOUR: Colour = (190, 0, 0)
NORMAL_COLOUR: Colour = (0, 120, 0)
NEUTRAL_COLOUR: Colour = (70, 70, 70)
_BACKGROUND: Colour = (255, 255, 255)
TILE_FRAME: Colour = (150, 150, 150)  # a 1-pixel frame around each tile
_EMPTY_TILE: Colour = (215, 215, 215)
Box = tuple[int, int, int, int]  # left, top, right (exclusive), bottom (exclusive)


@dataclass(frozen=True, kw_only=True)
class PanelStyle:
    """Sizes (pixels) and the colour scale. Tiles: longer side clamped to [min_side, max_side]."""

    min_side: int = 256
    max_side: int = 640
    gap: int = 8
    alpha: float = 0.5  # weight of the heat map over the image in the map tile
    low: float = MAP_LOW
    high: float = MAP_HIGH

    def __post_init__(self) -> None:
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(f"need 0 < min_side <= max_side, got {self.min_side}, {self.max_side}")
        normalize_map(np.zeros(1), low=self.low, high=self.high)  # checks low < high


@dataclass(frozen=True, kw_only=True)
class PanelText:
    """What a panel says under its pictures.

    image_threshold None: no decision, the panel says "uncalibrated". threshold_source names where a threshold
    came from ("F1-optimal", "calibration"); "" marks an uncalibrated default (the decision is shown as such).
    pixel_threshold: marked by a black line on the colour bar (None: no line).
    """

    pred_score: float
    image_threshold: float | None = None
    threshold_source: str = ""
    pixel_threshold: float | None = None
    caption: str = ""


@dataclass(frozen=True, kw_only=True)
class PanelLayout:
    """Where everything goes in a panel of `size` (width, height); boxes are (left, top, right, bottom)."""

    size: tuple[int, int]
    font_size: int
    titles: tuple[Box, Box, Box]
    tiles: tuple[Box, Box, Box]
    bar: Box
    labels_left: int
    lines: tuple[Box, ...]


def tile_size(image_size: tuple[int, int], style: PanelStyle = PanelStyle()) -> tuple[int, int]:
    """(width, height) of a tile for an image of `image_size`: same aspect, longer side within the style's range."""
    width, height = image_size
    longer = max(width, height)
    scale = min(max(longer, style.min_side), style.max_side) / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def font_size(tile: tuple[int, int]) -> int:
    """Text height for a tile: 1/20 of its longer side, within [13, 26] pixels."""
    return int(min(max(round(max(tile) / 20), 13), 26))


def _tick_label(value: float) -> str:
    return f"{value:.2f}"


def _tick_length(font: int) -> int:
    return max(3, font // 4)


def layout_panel(image_size: tuple[int, int], n_lines: int, *, style: PanelStyle = PanelStyle()) -> PanelLayout:
    """The geometry of a panel for an image of `image_size` with `n_lines` lines of text under the tiles."""
    tile_w, tile_h = tile_size(image_size, style)
    font = font_size((tile_w, tile_h))
    line_h = text_image("Hg", font).height
    margin, gap = style.gap, style.gap
    top = margin + line_h + gap // 2  # titles above the tiles
    lefts = [margin + i * (tile_w + gap) for i in range(3)]
    tiles = tuple((left, top, left + tile_w, top + tile_h) for left in lefts)
    titles = tuple((left, margin, left + tile_w, margin + line_h) for left in lefts)
    bar_w = max(12, font)
    bar_left = lefts[-1] + tile_w + 2 * gap
    bar = (bar_left, top, bar_left + bar_w, top + tile_h)
    labels_left = bar_labels_left(bar[2], font)
    width = labels_left + bar_label_width(font, style) + margin
    lines_top = top + tile_h + gap
    lines = tuple(
        (margin, lines_top + i * (line_h + 2), width - margin, lines_top + i * (line_h + 2) + line_h)
        for i in range(n_lines)
    )
    height = (lines[-1][3] if lines else top + tile_h) + margin
    return PanelLayout(
        size=(width, height), font_size=font, titles=titles, tiles=tiles, bar=bar, labels_left=labels_left, lines=lines
    )


def decision_line(text: PanelText) -> tuple[str, Colour]:
    """The score and decision sentence and its colour (red anomalous, green normal, grey without a decision).

    A score at or above the threshold is anomalous, as in `vip2clip predict`.
    """
    score = f"image score {text.pred_score:.3f}"
    if text.image_threshold is None or not np.isfinite(text.image_threshold):
        return f"{score}: uncalibrated (no threshold, no decision)", NEUTRAL_COLOUR
    anomalous = text.pred_score >= text.image_threshold
    label, colour = ("ANOMALOUS", ANOMALOUS_COLOUR) if anomalous else ("normal", NORMAL_COLOUR)
    if not text.threshold_source:
        return f"{score}: uncalibrated; {label.lower()} at the default {text.image_threshold:.3f}", NEUTRAL_COLOUR
    sign = ">=" if anomalous else "<"
    return f"{score} {sign} {text.image_threshold:.3f} ({text.threshold_source}): {label}", colour


def scale_line(text: PanelText, style: PanelStyle = PanelStyle()) -> str:
    """What the colours mean: the fixed scale and, when marked, the pixel threshold line."""
    line = f"colours: anomalous probability per pixel, fixed {_tick_label(style.low)}-{_tick_label(style.high)}"
    if text.pixel_threshold is not None and np.isfinite(text.pixel_threshold):
        line += f"; black line: pixel threshold {text.pixel_threshold:.3f}"
    return line


def panel_lines(text: PanelText, style: PanelStyle = PanelStyle()) -> list[tuple[str, Colour]]:
    """The lines of text under the tiles, top to bottom, with their colours."""
    lines = [(text.caption, (0, 0, 0))] if text.caption else []
    return [*lines, decision_line(text), (scale_line(text, style), NEUTRAL_COLOUR)]


def colour_bar(
    width: int, height: int, *, style: PanelStyle = PanelStyle(), marker: float | None = None
) -> Image.Image:
    """The colour scale as a vertical bar [height, width]: style.high at the top row, style.low at the bottom.

    marker: a map value drawn as a black line across the bar (e.g. the pixel threshold).
    """
    values = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    bar = Image.fromarray(jet(values))
    if marker is not None and np.isfinite(marker):
        fraction = float(normalize_map(np.array(marker), low=style.low, high=style.high))
        row = round((1.0 - fraction) * (height - 1))
        ImageDraw.Draw(bar).rectangle((0, max(0, row - 1), width - 1, min(height - 1, row + 1)), fill=(0, 0, 0))
    return bar


def mask_tile(mask: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    """A binary mask [H, W] as white on black at `size` (width, height); None: an empty grey tile."""
    if mask is None:
        return Image.new("RGB", size, _EMPTY_TILE)
    tile = Image.fromarray(np.multiply(np.asarray(mask) > 0, 255, dtype=np.uint8), mode="L")  # 1 byte per pixel
    return tile.resize(size, Image.NEAREST).convert("RGB")


def make_panel(
    image: Image.Image | np.ndarray,
    anomaly_map: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    mask_title: str = GROUND_TRUTH,
    text: PanelText | None = None,
    style: PanelStyle = PanelStyle(),
) -> Image.Image:
    """A labelled panel (see the module docstring). image: PIL or [H, W, 3]; anomaly_map [h, w] and mask [h', w']
    cover the whole image at any resolution (resized to the tile); mask None: a "no mask" tile.
    text: the caption, score and decision (None: only the scale line)."""
    rgb = image if isinstance(image, Image.Image) else Image.fromarray(as_rgb_array(image))
    rgb = rgb if rgb.mode == "RGB" else rgb.convert("RGB")  # no full-size copy: the tile is a preview
    lines = panel_lines(text, style) if text else [(scale_line(PanelText(pred_score=0.0), style), NEUTRAL_COLOUR)]
    layout = layout_panel(rgb.size, len(lines), style=style)
    tile = tile_size(rgb.size, style)
    rgb = rgb.resize(tile, Image.BICUBIC) if rgb.size != tile else rgb
    tiles = [
        rgb,
        heatmap_overlay(
            rgb,
            resize_map(np.asarray(anomaly_map, dtype=np.float32), tile),
            low=style.low,
            high=style.high,
            alpha=style.alpha,
        ),
        mask_tile(mask, tile),
    ]
    titles = ["input", "anomaly map", mask_title if mask is not None else NO_MASK]
    panel = Image.new("RGB", layout.size, _BACKGROUND)
    for picture, box, title, title_box in zip(tiles, layout.tiles, titles, layout.titles, strict=True):
        paste_titled(panel, picture, box=box, title=title, title_box=title_box, font=layout.font_size)
    marker = text.pixel_threshold if text else None
    paste_colour_bar(
        panel, layout.bar, labels_left=layout.labels_left, font=layout.font_size, style=style, marker=marker
    )
    paste_lines(panel, lines, boxes=layout.lines, font=layout.font_size)
    return panel


def paste_titled(panel: Image.Image, picture: Image.Image, *, box: Box, title: str, title_box: Box, font: int) -> None:
    """A tile at `box`, framed, and its title centred in `title_box` (made smaller or cut short to fit). The frame
    sits in the gap around the tile: an all-white mask would otherwise merge into the white background."""
    panel.paste(picture, box[:2])
    ImageDraw.Draw(panel).rectangle((box[0] - 1, box[1] - 1, box[2], box[3]), outline=TILE_FRAME)
    label = fitted_text_image(title, font, max_width=title_box[2] - title_box[0])
    panel.paste(label, (title_box[0] + (title_box[2] - title_box[0] - label.width) // 2, title_box[1]))


def paste_lines(panel: Image.Image, lines: list[tuple[str, Colour]], *, boxes: tuple[Box, ...], font: int) -> None:
    """Lines of text (with their colours) into their boxes, each fitted to its box's width."""
    for (line, colour), box in zip(lines, boxes, strict=True):
        panel.paste(fitted_text_image(line, font, max_width=box[2] - box[0], colour=colour), box[:2])


def bar_labels_left(bar_right: int, font: int) -> int:
    """Where the colour bar's numbers start: after the tick and a space, so that "-" reads as no minus."""
    return bar_right + _tick_length(font) + max(4, font // 3)


def bar_label_width(font: int, style: PanelStyle = PanelStyle()) -> int:
    """The width of the colour bar's widest number."""
    return max(text_image(_tick_label(v), font).width for v in (style.low, style.high))


def paste_colour_bar(
    panel: Image.Image, bar: Box, *, labels_left: int, font: int, style: PanelStyle, marker: float | None = None
) -> None:
    """The colour bar at `bar` with tick marks and numbers at its top (high), middle and bottom (low)."""
    _, top, right, bottom = bar
    panel.paste(colour_bar(right - bar[0], bottom - top, style=style, marker=marker), bar[:2])
    draw = ImageDraw.Draw(panel)
    for fraction in (1.0, 0.5, 0.0):
        y = round(bottom - 1 - fraction * (bottom - 1 - top))
        draw.line((right, y, right + _tick_length(font) - 1, y), fill=(0, 0, 0), width=1)
        label = text_image(_tick_label(style.low + fraction * (style.high - style.low)), font)
        label_top = min(max(y - label.height // 2, top), bottom - label.height)  # the end labels stay beside the bar
        panel.paste(label, (labels_left, label_top))
