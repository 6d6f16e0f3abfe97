"""Explanation panels for files (`predict --explain`, `test --save-maps --explain`): one labelled PNG per image.

Each image is scored again by `ViP2CLIP.explain` (a second forward pass, run only when explanations are asked for)
and drawn by `visualization.explain_panel`. The plain model is explained: its tapped layers and its prompts'
attention, so `--explain` goes with neither tiling nor reference images (whose maps come from elsewhere) nor an
ONNX engine (which has no layers to show).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vip2clip.data.images import BadImageError, load_image, load_mask
from vip2clip.data.transforms import preprocess
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.fileio import atomic_save_image
from vip2clip.utils.progress import Progress, silent
from vip2clip.visualization.explain_panel import make_explanation_panel
from vip2clip.visualization.panel import PanelText

logger = logging.getLogger(__name__)
EXPLAIN_DIR = "explain"


@dataclass(frozen=True)
class ExplainItem:
    """One image to explain: its file, the panel's path below the output folder, its caption and its ground truth
    (None: no mask tile)."""

    image: Path
    name: str
    caption: str = ""
    mask: Path | None = None


@dataclass(frozen=True)
class Decision:
    """The image threshold the panels decide at (None: no decision) and where it came from."""

    image_threshold: float | None = None
    source: str = ""


def _batches(items: Sequence[ExplainItem], size: int) -> Iterator[Sequence[ExplainItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_explanations(
    model: ViP2CLIP,
    items: Sequence[ExplainItem],
    *,
    out_dir: str | Path,
    decision: Decision = Decision(),
    batch_size: int = 8,
    progress: Progress = silent,
) -> int:
    """Write one explanation panel per item into `out_dir` (by batches of `batch_size`); returns the number
    written. An unreadable image or mask is reported (logged) and skipped."""
    out_dir, written = Path(out_dir), 0
    batches = list(_batches(items, batch_size))
    for batch in progress(batches, total=len(batches), desc="explaining"):
        loaded = []
        for item in batch:
            try:
                loaded.append((item, load_image(item.image), load_mask(item.mask) if item.mask else None))
            except BadImageError as error:
                logger.warning("not explained: %s", error)
        if not loaded:
            continue
        images = torch.stack([preprocess(rgb, model.config.image_size) for _, rgb, _ in loaded])
        explanation = model.explain(images)
        for i, (item, rgb, mask) in enumerate(loaded):
            text = PanelText(
                pred_score=float(explanation.pred_score[i]),
                image_threshold=decision.image_threshold,
                threshold_source=decision.source,
                caption=item.caption,
            )
            atomic_save_image(
                make_explanation_panel(rgb, explanation, index=i, mask=mask, text=text), out_dir / item.name
            )
            written += 1
    return written


def prediction_items(out_dir: str | Path) -> list[ExplainItem]:
    """The judged images of a `predict` run in OUT (its predictions.json), each to OUT/explain/KEY.png (the name
    of its mask file in masks/)."""
    rows = json.loads((Path(out_dir) / "predictions.json").read_text(encoding="utf-8"))["predictions"]
    return [
        ExplainItem(Path(row["path"]), EXPLAIN_DIR + "/" + row["pred_mask"].removeprefix("masks/"), row["path"])
        for row in rows
        if row["pred_mask"]
    ]
