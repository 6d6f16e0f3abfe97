"""Evaluation panels (`test`/`benchmark --save-maps`, the demo's maps/): one labelled PNG per image.

A panel shows the input, its anomaly map on the fixed colour scale (`visualization.heatmap`), the ground truth
(or the predicted mask where the image has none), the image score and the decision at the dataset's F1-optimal
thresholds: the ones written to calibration.json, so a panel says what `vip2clip predict --calibration` would.
Those thresholds are known only once every class has been scored. The maps and masks of the images to draw are
therefore spooled class by class to unlinked temporary files in the panels folder (in the maps' storage dtype,
0.5 MB per image at 518 px in float16, less than the PNG each becomes) and the panels drawn after the last class:
memory stays that of one class, and a run that stops early leaves no temporary file behind.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.images import load_image
from vip2clip.data.index import DatasetIndex, Sample
from vip2clip.evaluation.results import ClassBatch
from vip2clip.runs.explain_run import EXPLAIN_DIR, ExplainItem
from vip2clip.utils.fileio import atomic_save_image
from vip2clip.visualization.panel import GROUND_TRUTH, PREDICTED_MASK, PanelStyle, PanelText, make_panel

THRESHOLD_SOURCE = "F1-optimal"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def panel_order(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Rows to draw, up to `limit`: anomalous and normal images alternately (anomalous first), so that even a few
    panels show a normal image staying cold next to a defect lighting up."""
    anomalous, normal = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pairs = min(anomalous.size, normal.size)
    alternating = np.stack([anomalous[:pairs], normal[:pairs]], axis=1).ravel()
    order = np.concatenate([alternating, anomalous[pairs:], normal[pairs:]])
    return order if limit is None else order[:limit]


def panel_name(sample: Sample) -> str:
    """A sample's panel file below the panels folder: CLASS/DEFECT_STEM.png (unsafe characters replaced)."""
    stem = _UNSAFE_NAME.sub("_", f"{sample.specie_name or 'image'}_{Path(sample.img_path).stem}")
    return f"{_UNSAFE_NAME.sub('_', sample.cls_name)}/{stem}.png"


def panel_caption(sample: Sample) -> str:
    truth = "anomalous" if sample.anomaly else "normal"
    return f"{sample.cls_name} / {sample.specie_name or '-'} / {Path(sample.img_path).name} (truth: {truth})"


def explain_items(
    index: DatasetIndex, classes: Sequence[str], *, limit: int | None, split: str = "test"
) -> list[ExplainItem]:
    """`test --save-maps --explain`: per class the images its panels show (`panel_order`), each to
    explain/CLASS/DEFECT_STEM.png with its ground truth where it has one."""
    items = []
    for name in classes:
        samples = index.samples(split, [name])
        for row in panel_order(np.array([s.anomaly for s in samples]), limit):
            sample = samples[int(row)]
            mask = Path(index.resolve(sample.mask_path)) if sample.mask_path else None
            image = Path(index.resolve(sample.img_path))
            items.append(ExplainItem(image, f"{EXPLAIN_DIR}/{panel_name(sample)}", panel_caption(sample), mask))
    return items


def _spool(array: np.ndarray, rows: np.ndarray, folder: Path) -> np.ndarray:
    """array[rows] in a memory map of an unlinked temporary file in `folder` (freed with the map), copied row by
    row so that no second in-memory copy of a class's maps is made."""
    with tempfile.TemporaryFile(dir=folder, prefix=".panels-") as handle:  # the map keeps its own descriptor
        spooled = np.memmap(handle, dtype=array.dtype, mode="w+", shape=(rows.size, *array.shape[1:]))
    for position, row in enumerate(rows):
        spooled[position] = array[row]
    return spooled


@dataclass(kw_only=True)
class _SpooledClass:
    """The images of one class to draw: files, names, scores, truth, and their maps and masks [n, S, S]."""

    image_paths: list[Path]
    names: list[str]  # CLASS/DEFECT_STEM.png
    captions: list[str]
    scores: np.ndarray
    has_truth: np.ndarray
    maps: np.ndarray
    masks: np.ndarray


class PanelSpool:
    """Collects the images to draw per class (`add`), draws them once the thresholds are known (`write`)."""

    def __init__(self, out_dir: str | Path, limit: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.limit = limit
        self._classes: list[_SpooledClass] = []

    def add(self, dataset: AnomalyDataset, outputs: ClassBatch, *, chosen: Sequence[int] | None = None) -> None:
        """Spool up to `limit` images of one evaluated class (see `panel_order`). With the class split over ranks,
        `chosen` holds the dataset positions picked over the whole class, and this rank spools those it holds."""
        if outputs.anomaly_map is None or outputs.anomaly_map.size == 0:
            return
        if chosen is None:
            rows = panel_order(outputs.gt_label, self.limit)
        else:
            row_of = {int(position): row for row, position in enumerate(outputs.positions)}
            rows = np.array([row_of[p] for p in chosen if p in row_of], dtype=np.int64)
        if rows.size == 0:
            return
        samples = [dataset.samples[int(outputs.positions[row])] for row in rows]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._classes.append(
            _SpooledClass(
                image_paths=[Path(dataset.index.resolve(s.img_path)) for s in samples],
                names=[panel_name(s) for s in samples],
                captions=[panel_caption(s) for s in samples],
                scores=outputs.pred_score[rows].copy(),
                has_truth=outputs.pixel_rows[rows].copy(),
                maps=_spool(outputs.anomaly_map, rows, self.out_dir),
                masks=_spool(outputs.gt_mask, rows, self.out_dir),
            )
        )

    def write(self, image_threshold: float, pixel_threshold: float, *, model_size: int) -> int:
        """Draw every spooled image at these thresholds (NaN: undefined); returns the number of PNGs written.

        Tiles are drawn at most at `model_size` (the maps' resolution), at least at the style's minimum side.
        """
        style = PanelStyle(max_side=max(model_size, PanelStyle.min_side))
        known = {"image": not math.isnan(image_threshold), "pixel": not math.isnan(pixel_threshold)}
        written = 0
        for spooled in self._classes:
            for i, path in enumerate(spooled.image_paths):
                anomaly_map = np.asarray(spooled.maps[i], dtype=np.float32)
                if spooled.has_truth[i]:
                    mask, title = spooled.masks[i], GROUND_TRUTH
                else:  # no ground truth: what the model flags at the pixel threshold, if there is one
                    mask, title = (anomaly_map >= pixel_threshold if known["pixel"] else None), PREDICTED_MASK
                text = PanelText(
                    pred_score=float(spooled.scores[i]),
                    image_threshold=image_threshold if known["image"] else None,
                    threshold_source=THRESHOLD_SOURCE,
                    pixel_threshold=pixel_threshold if known["pixel"] else None,
                    caption=spooled.captions[i],
                )
                panel = make_panel(load_image(path), anomaly_map, mask=mask, mask_title=title, text=text, style=style)
                atomic_save_image(panel, self.out_dir / spooled.names[i])
                written += 1
        self._classes.clear()  # frees the spooled files
        return written
