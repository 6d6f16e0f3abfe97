"""`vip2clip calibrate` on files and folders: normal-quantile thresholds from defect-free images, streamed.

Images are found by `vip2clip.data.files.scan_images` and scored by `Predictor.score`, the one batching path (with
mutual scoring, the normal images of each group score each other, as `predict` will score them). Under torchrun
each rank scores a share and rank 0 merges the scores and the streamed pixel quantiles exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vip2clip.data.files import ImageScan, no_images_error, scan_images
from vip2clip.data.images import BadImageError, image_size
from vip2clip.inference import calibration as calib
from vip2clip.inference.predictor import Predictor, non_finite_problem
from vip2clip.metrics.threshold import DEFAULT_IMAGE_QUANTILE, DEFAULT_PIXEL_QUANTILE, StreamingQuantile
from vip2clip.runs.folder_run import load_input, unreadable
from vip2clip.runs.grouping import check_groups, folder_share, group_images
from vip2clip.scoring.mutual_rule import DEFAULT_GROUP
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

_PIXEL_CHUNK = 1 << 20  # map values added to the streaming quantile at once


def _map_pixels(predictor: Predictor, path: Path) -> int:
    """How many map values an image gives: S*S, or its own pixel count when tiled (from its header; 0 when that
    is unreadable, the image is then reported as unreadable when scored)."""
    if predictor.tiling is None:
        return predictor.image_size**2
    try:
        width, height = image_size(path)
    except BadImageError:
        return 0
    return width * height


def calibrate_folder(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
    run: RunContext = LOCAL_RUN,
    mutual_group: str = DEFAULT_GROUP,
) -> tuple[calib.Calibration, list[tuple[str, str]], ImageScan]:
    """Normal-quantile calibration (`calib.calibrate_from_normal`) on the defect-free images in `paths`.

    Pixel scores are the maps at the model's input size [S, S] (tiled: the stitched maps at the images' own size,
    the maps `predict` thresholds), streamed into an exact quantile so that memory stays bounded. Returns the
    calibration, the unreadable files (skipped) and what the folder search skipped. Raises ValueError naming the
    files when the model's output for any image is NaN or infinite: thresholds from a broken model would decide
    nothing.
    """
    if not 0.0 < image_quantile <= 1.0:  # before scoring every image, not after
        raise ValueError(f"image quantile must be in (0, 1], got {image_quantile}")
    world = run.world
    scan = scan_images(paths) if world.is_main else None
    scan = world.broadcast(scan)  # one search: every rank splits the same list
    images = scan.images
    if not images:
        raise no_images_error(paths, scan)
    pixels = StreamingQuantile(pixel_quantile, max(1, sum(_map_pixels(predictor, image.path) for image in images)))
    scores: list[float] = []
    failed: list[tuple[str, str]] = []
    broken: list[str] = []
    if predictor.mutual is not None:  # the normal images of each group score each other, as predict will
        check_groups(group_images(images, mutual_group), mutual_group)
    share, stream, _ = folder_share(predictor, images, load=load_input, world=world, by=mutual_group)
    for scored in run.progress(stream, total=len(share), desc="calibrate"):
        if scored.error is not None:
            failed.append(unreadable(scored))
        elif non_finite_problem(scored.pred_score, scored.anomaly_map) is not None:
            broken.append(str(scored.source.path))
        elif not broken:  # once one output is broken the run will be refused: stop collecting
            scores.append(scored.pred_score)
            for rows in np.array_split(scored.anomaly_map, max(1, scored.anomaly_map.size // _PIXEL_CHUNK)):
                pixels.add(rows)  # in row blocks: the quantile works in float64
    reports = world.gather((scores, pixels, failed, broken))
    calibration = None
    if world.is_main:
        scores, failed, broken = ([item for report in reports for item in report[part]] for part in (0, 2, 3))
        for report in reports[1:]:
            pixels.merge(report[1])
        if broken:
            listed = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
            raise ValueError(
                f"the model produced NaN or infinite scores or maps for {len(broken)} of {len(images)} image(s) "
                f"({listed}); no calibration written: check the checkpoint and CLIP weights"
            )
        if not scores:
            raise ValueError("none of the images could be read: " + "; ".join(f"{p}: {e}" for p, e in failed[:5]))
        calibration = calib.calibrate_from_normal(
            scores, pixels, identity=predictor.identity, image_quantile=image_quantile
        )
        calibration = dataclasses.replace(calibration, computation=predictor.computation)
    return world.broadcast((calibration, failed, scan))
