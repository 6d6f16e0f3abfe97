"""The files a folder run (`vip2clip.runs.folder_run`) writes per image: the mask, overlay and panel PNGs and
the raw map, named after the image's key (layout in the folder run's module docstring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vip2clip.data.files import InputImage
from vip2clip.inference.predictor import DEFAULT_THRESHOLD, Thresholds
from vip2clip.outputs import ImageItem
from vip2clip.runs.journal import output_name
from vip2clip.utils.fileio import atomic_save_image, atomic_save_npy
from vip2clip.visualization.heatmap import heatmap_overlay
from vip2clip.visualization.panel import PREDICTED_MASK, PanelText, make_panel


def save_outputs(
    out_dir: Path, image: InputImage, *, rgb: Image.Image, result: ImageItem, overlays: bool
) -> tuple[str, str]:
    """Write the mask (and overlay) PNGs of one image; returns their paths relative to `out_dir`.

    The overlay's colours span map values 0 (blue) to 1 (red) for every image (the fixed scale of
    `visualization.heatmap`), so colours compare across images.
    """
    name = output_name(image.key)
    mask_name, overlay_name = f"masks/{name}", f"overlays/{name}" if overlays else ""
    mask = Image.fromarray(np.multiply(result.pred_mask, 255, dtype=np.uint8), mode="L")  # 1 byte per pixel
    atomic_save_image(mask, out_dir / mask_name)
    if overlays:
        atomic_save_image(heatmap_overlay(rgb, result.anomaly_map), out_dir / overlay_name)
    return mask_name, overlay_name


def save_raw_map(out_dir: Path, image: InputImage, *, result: ImageItem) -> str:
    """Write maps/KEY.npy (the map at the image's size, float16) atomically; returns its path relative to out_dir."""
    name = f"maps/{output_name(image.key).removesuffix('.png')}.npy"
    atomic_save_npy(result.anomaly_map.astype(np.float16), out_dir / name)
    return name


def panel_threshold_source(thresholds: Thresholds) -> str:
    """How the image threshold was chosen, for a panel: "" for the uncalibrated default."""
    if "calibration" in thresholds.source:
        return "calibration"
    uncalibrated = "uncalibrated" in thresholds.source and thresholds.image == DEFAULT_THRESHOLD
    return "" if uncalibrated else "given"


def save_panel_output(out_dir: Path, image: InputImage, *, rgb: Image.Image, result: ImageItem, source: str) -> str:
    """Write panels/KEY.png for one image (see the module docstring); returns its path relative to `out_dir`."""
    name = f"panels/{output_name(image.key)}"
    text = PanelText(
        pred_score=result.pred_score,
        image_threshold=result.image_threshold,
        threshold_source=source,
        pixel_threshold=result.pixel_threshold,
        caption=image.key,
    )
    atomic_save_image(
        make_panel(rgb, result.anomaly_map, mask=result.pred_mask, mask_title=PREDICTED_MASK, text=text), out_dir / name
    )
    return name
