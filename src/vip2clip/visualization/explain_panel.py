"""Explanation panels (`predict --explain`, `test --save-maps --explain`): the paper's Fig. 7 and Fig. 3 for one image.

    input | layer 6 | layer 12 | layer 18 | layer 24 | fused map | ground truth    ## 1.00  (row 1: Fig. 7)
          | normal prompt, layer 6 | ...  | normal prompt, layer 24                 ## 0.00  (row 2: Fig. 3)
          | anomalous prompt, layer 6 | ... | anomalous prompt, layer 24                     (row 3: Fig. 3)
    caption / score and decision / what the colours of each row mean

Row 1 colours each tapped layer's anomaly map and the fused map (their mean, as `predict` gives it), all smoothed
alike, on the fixed 0-1 probability scale of every panel (`visualization.heatmap`), so that layers compare. Rows 2-3
show where ViP-FGP's normal and anomalous prompt look: attention weights over the patches (each map sums to 1),
each map scaled to its own maximum, since their values shrink with the number of patches. The arrays come from
`ViP2CLIP.explain` (`vip2clip.model.explain`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vip2clip.data.transforms import resize_map
from vip2clip.model.explain import Explanation
from vip2clip.visualization.heatmap import as_rgb_array, heatmap_overlay
from vip2clip.visualization.panel import (
    GROUND_TRUTH,
    NEUTRAL_COLOUR,
    Box,
    PanelStyle,
    PanelText,
    bar_label_width,
    bar_labels_left,
    decision_line,
    font_size,
    mask_tile,
    paste_colour_bar,
    paste_lines,
    paste_titled,
    tile_size,
)
from vip2clip.visualization.text import Colour, text_image

EXPLAIN_STYLE = PanelStyle(min_side=160, max_side=224)
PROMPTS = ("normal", "anomalous")
_BACKGROUND: Colour = (255, 255, 255)


def _grid(
    tile: tuple[int, int], columns: int, *, rows: int, n_lines: int, style: PanelStyle
) -> tuple[list[list[Box]], list[list[Box]], Box, int, tuple[Box, ...], tuple[int, int], int]:
    """Tile boxes [row][column], their title boxes, the colour bar beside row 1, where its numbers start, the
    text lines' boxes, the panel size and the font size."""
    font = font_size(tile)
    line_h, gap, margin = text_image("Hg", font).height, style.gap, style.gap
    row_h = line_h + gap // 2 + tile[1] + gap
    lefts = [margin + c * (tile[0] + gap) for c in range(columns)]
    titles = [[(x, margin + r * row_h, x + tile[0], margin + r * row_h + line_h) for x in lefts] for r in range(rows)]
    tiles = [
        [
            (x, t[1] + line_h + gap // 2, x + tile[0], t[1] + line_h + gap // 2 + tile[1])
            for x, t in zip(lefts, row, strict=True)
        ]
        for row in titles
    ]
    bar_left = lefts[-1] + tile[0] + 2 * gap
    bar = (bar_left, tiles[0][0][1], bar_left + max(12, font), tiles[0][0][3])
    labels_left = bar_labels_left(bar[2], font)
    width = labels_left + bar_label_width(font, style) + margin
    top = tiles[-1][0][3] + gap
    lines = tuple(
        (margin, top + i * (line_h + 2), width - margin, top + i * (line_h + 2) + line_h) for i in range(n_lines)
    )
    height = (lines[-1][3] if lines else top) + margin
    return tiles, titles, bar, labels_left, lines, (width, height), font


def _lines(text: PanelText, attention: bool, style: PanelStyle) -> list[tuple[str, Colour]]:
    lines = [(text.caption, (0, 0, 0))] if text.caption else []
    lines += [
        decision_line(text),
        (
            f"row 1 (paper Fig. 7): anomaly map of each tapped layer and their mean (the fused "
            f"map), smoothed alike; colours: anomalous probability, fixed {style.low:.2f}-{style.high:.2f}",
            NEUTRAL_COLOUR,
        ),
    ]
    if attention:
        lines.append(
            (
                "rows 2-3 (paper Fig. 3): where the normal and the anomalous prompt look (ViP-FGP attention "
                "over the patches, mean of the heads), each map scaled to its own maximum",
                NEUTRAL_COLOUR,
            )
        )
    return lines


def _overlay(rgb: Image.Image, values: np.ndarray, *, low: float, high: float, style: PanelStyle) -> Image.Image:
    return heatmap_overlay(
        rgb, resize_map(np.asarray(values, dtype=np.float32), rgb.size), low=low, high=high, alpha=style.alpha
    )


def make_explanation_panel(
    image: Image.Image | np.ndarray,
    explanation: Explanation,
    *,
    index: int = 0,
    mask: np.ndarray | None = None,
    text: PanelText | None = None,
    style: PanelStyle = EXPLAIN_STYLE,
) -> Image.Image:
    """The panel of image `index` of `explanation` (see the module docstring). image: the input, PIL or [H, W, 3];
    mask: its ground truth [h, w] (None: no mask tile); text: caption, score and decision (None: the score only)."""
    rgb = Image.fromarray(as_rgb_array(image))
    tile = tile_size(rgb.size, style)
    rgb = rgb.resize(tile, Image.BICUBIC) if rgb.size != tile else rgb
    layers, attention = explanation.layers, explanation.attention
    text = text or PanelText(pred_score=float(explanation.pred_score[index]))
    row = [(rgb, "input")]
    row += [
        (_overlay(rgb, m, low=style.low, high=style.high, style=style), f"layer {n}")
        for m, n in zip(explanation.smoothed_layer_maps[index], layers, strict=True)
    ]
    row.append(
        (_overlay(rgb, explanation.anomaly_map[index], low=style.low, high=style.high, style=style), "fused map")
    )
    if mask is not None:
        row.append((mask_tile(mask, tile), GROUND_TRUTH))
    rows = [row]
    for state, prompt in enumerate(PROMPTS if attention is not None else ()):
        maps = attention[index, :, state]
        rows.append(
            [
                (
                    _overlay(rgb, m / max(float(m.max()), 1e-12), low=0.0, high=1.0, style=style),
                    f"{prompt} prompt, layer {n}",
                )
                for m, n in zip(maps, layers, strict=True)
            ]
        )
    lines = _lines(text, attention is not None, style)
    tiles, titles, bar, labels_left, line_boxes, size, font = _grid(
        tile, len(row), rows=len(rows), n_lines=len(lines), style=style
    )
    panel = Image.new("RGB", size, _BACKGROUND)
    for r, pictures in enumerate(rows):
        offset = 1 if r else 0  # attention rows sit under the layers, not under the input
        for c, (picture, title) in enumerate(pictures):
            paste_titled(
                panel, picture, box=tiles[r][c + offset], title=title, title_box=titles[r][c + offset], font=font
            )
    paste_colour_bar(panel, bar, labels_left=labels_left, font=font, style=style)
    paste_lines(panel, lines, boxes=line_boxes, font=font)
    return panel
