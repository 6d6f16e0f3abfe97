"""`vip2clip predict` and `vip2clip calibrate` on files and folders: resumable outputs, streamed calibration.

Images are found by `vip2clip.data.files.scan_images` (masks skipped, unreadable folders listed) and scored by
`Predictor.score`, the one batching path.

Layout of OUT (predict):
- `predictions.csv` / `predictions.json`: one row per image found in THIS run, in key order (path, pred_score,
  pred_label, max_pixel_score, defect_area at the pixel threshold, width, height, pred_mask, overlay and panel
  files, error). pred_label is "normal", "anomalous" or "error": a file that could not be read, or whose score or map
  is NaN/infinite (fail closed), has an "error" row with the reason and no numbers. The JSON also holds the
  settings (the model's identity, thresholds, the inputs), the rows that could not be judged ("failed") and what
  the folder search skipped ("search"). Written when a run finishes.
- `masks/KEY.png` (0/255, the image's original size) and `overlays/KEY.png` (heat map blended over the image),
  where KEY is the image's path below the folder given on the command line (its name included), with the
  suffix folded into the name: `good/a.jpg` -> `masks/good/a_jpg.png` (so `a.jpg` and `a.png` never collide).
- with `panels`, `panels/KEY.png`: input | anomaly map | predicted mask with titles, the colour bar, the score and
  the decision (`vip2clip.visualization.panel`; a preview, at most 640 px a tile).
- with `raw_maps`, `maps/KEY.npy`: the anomaly map at the image's original size as float16 [H, W] (column
  `anomaly_map`; empty without raw maps).
- `predictions.jsonl`: the journal. A settings line, then one line per judged image, appended after its
  PNGs are written. A re-run with the same OUT, the same settings and the same inputs (the paths given, not
  their contents) resumes: it skips every image whose line exists, whose file is unchanged (size and mtime) and
  whose outputs are present, and redoes the rest. A killed run loses at most the image in progress.

The results describe exactly the files of the latest run: rows (and mask, overlay and panel files) of images that
were deleted or became unreadable since an earlier run are removed. A run with other settings or other inputs is
refused unless `overwrite`, which starts a new result set in OUT (the earlier rows and their files are removed).

Several ranks (`world`, under torchrun) each score a contiguous share of the images to do (in one-process batches)
and write their files and their own journal (`predictions.rank<r>.jsonl`, merged by rank 0); rank 0 writes the
tables, rows as in one process. `calibrate_folder` merges the scores and the streamed pixel quantiles exactly.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vip2clip.data.files import ImageScan, InputImage, no_images_error, scan_images
from vip2clip.data.images import BadImageError, image_size, load_image
from vip2clip.inference import calibration as calib
from vip2clip.inference.grouping import check_groups, folder_share, group_images, whole_groups
from vip2clip.inference.journal import (
    assign_keys,
    is_done,
    journal_file,
    merge_rank_journals,
    remove_stale_outputs,
    start_journal,
)
from vip2clip.inference.predictor import (
    ERROR,
    ImageResult,
    Predictor,
    ScoredImage,
    non_finite_problem,
)
from vip2clip.inference.run_outputs import panel_threshold_source, save_outputs, save_panel_output, save_raw_map
from vip2clip.metrics.threshold import DEFAULT_IMAGE_QUANTILE, DEFAULT_PIXEL_QUANTILE, StreamingQuantile
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.fileio import atomic_write_json, atomic_write_text, json_line
from vip2clip.utils.progress import Progress, silent

logger = logging.getLogger(__name__)

_PIXEL_CHUNK = 1 << 20  # map values added to the streaming quantile at once
CSV_COLUMNS = (
    "path", "pred_score", "pred_label", "max_pixel_score", "defect_area", "width", "height", "pred_mask", "overlay",
    "panel", "anomaly_map", "error",
)  # fmt: skip


@dataclass
class RunSummary:
    """found: images found; predicted: judged in this run; skipped: already done (resumed); failed: unreadable
    files (path, problem); errors: files whose score or map was NaN/infinite (path, problem); anomalous: rows
    judged anomalous; total_rows: rows in the tables (= found); scan: what the folder search skipped;
    self_references: judged rows that are reference images too (each compared with the other references only);
    mutual_groups: the reports of the groups that scored each other in this run (mutual scoring)."""

    found: int
    predicted: int
    skipped: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    anomalous: int = 0
    total_rows: int = 0
    out_dir: Path = Path()
    scan: ImageScan = field(default_factory=ImageScan)
    self_references: int = 0
    mutual_groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every image found was judged and every folder could be searched."""
        return not (self.failed or self.errors or self.scan.unreadable_folders)


def _load(image: InputImage) -> Image.Image:
    return load_image(image.path)


def _failure(scored: ScoredImage[InputImage]) -> tuple[str, str]:
    logger.warning("skipping unreadable file %s", scored.error)
    return str(scored.source.path), scored.error.problem


def run_settings(
    predictor: Predictor,
    overlays: bool,
    panels: bool = False,
    raw_maps: bool = False,
    inputs: Sequence[str | Path] = (),
    mutual_group: str = "folder",
) -> dict[str, Any]:
    """What decides the outputs: the model's identity (with tiling and the references' rule), the thresholds, the
    overlay switch, the inputs (the paths given, absolute and sorted), and the panel and raw-map switches and
    which reference images, the last ones only when used."""
    settings = {
        "model": predictor.identity.to_dict(),
        "image_threshold": predictor.thresholds.image,
        "pixel_threshold": predictor.thresholds.pixel,
        "thresholds_source": predictor.thresholds.source,
        "overlays": overlays,
        "inputs": sorted({str(Path(path).resolve()) for path in inputs}),
    }
    switches = {"panels": panels, "raw_maps": raw_maps}
    settings.update({name: True for name, used in switches.items() if used})  # absent when off: see above
    if predictor.references is not None:
        settings["references_sha256"] = predictor.references.record()["sha256"]
    if predictor.mutual is not None:
        settings["mutual_group"] = mutual_group
    return settings


def _record(
    image: InputImage, result: ImageResult, mask: str, overlay: str, panel: str = "", raw_map: str = ""
) -> dict[str, Any]:
    stat = image.path.stat()
    width, height = result.size
    return {
        "path": str(image.path),
        "key": image.key,
        "pred_score": result.pred_score,
        "pred_label": result.pred_label,
        "max_pixel_score": result.max_pixel_score,
        "defect_area": result.defect_area,
        "width": width,
        "height": height,
        "pred_mask": mask,
        "overlay": overlay,
        "panel": panel,
        "anomaly_map": raw_map,
        "error": "",
        "file_size": stat.st_size,
        "file_mtime_ns": stat.st_mtime_ns,
    }


def _error_row(image: InputImage, problem: str) -> dict[str, Any]:
    """The row of an image that could not be judged: pred_label "error", the reason, no numbers or files."""
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, None)
    return {**row, "path": str(image.path), "key": image.key, "pred_label": ERROR, "pred_mask": "", "overlay": "",
            "panel": "", "anomaly_map": "", "error": problem}  # fmt: skip


def write_tables(
    out_dir: Path, settings: dict, rows: list[dict], scan: ImageScan | None = None, run: dict | None = None
) -> None:
    """predictions.csv and predictions.json (settings, every row, the rows not judged, the search, and `run`: how
    the last run ran, world_size and device), atomically.

    Numbers that are not finite (never in a judged row) are empty in the CSV and null in the JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", buffer.getvalue())
    payload = {
        "settings": settings,
        "predictions": [{key: row.get(key, "") for key in CSV_COLUMNS} for row in rows],  # older rows lack some
        "failed": [{"path": row["path"], "error": row["error"]} for row in rows if row["pred_label"] == ERROR],
        "search": (scan or ImageScan()).to_dict(),
    }
    if run is not None:
        payload["run"] = run
    atomic_write_json(out_dir / "predictions.json", payload)


def predict_folder(
    predictor: Predictor,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    overwrite: bool = False,
    overlays: bool = True,
    progress: Progress = silent,
    panels: bool = False,
    raw_maps: bool = False,
    world: World = LOCAL,
    mutual_group: str = "folder",
) -> RunSummary:
    """Predict every image in `paths` (files or folders, recursive) into `out_dir`; see the module docstring.
    With `predictor.mutual`, the images of each group (`mutual_group.group_images`) score each other.

    Unreadable files and images whose model output is not finite get "error" rows, are listed in the summary
    and never stop the run (`RunSummary.complete` is False then).
    """
    out_dir = Path(out_dir)
    plan = None
    if world.is_main:  # one search and one journal check, shared with the other ranks
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{out_dir} is a file; --out must be a folder (new, or one of an earlier predict run)")
        scan = scan_images(paths, exclude=out_dir)
        images = scan.images
        if not images:
            raise no_images_error(paths, scan)
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = run_settings(predictor, overlays, panels, raw_maps, paths, mutual_group)
        records, earlier = start_journal(out_dir, settings, overwrite, images)
        todo = [image for image in images if not is_done(image, records.get(str(image.path)), out_dir)]
        if predictor.mutual is not None:  # a group is scored whole: the resumed ones again with the rest
            todo = whole_groups(todo, images, mutual_group)
            check_groups(group_images(todo, mutual_group))
        plan = assign_keys(todo, records)
    todo = world.broadcast(plan)
    share, stream, groups = folder_share(predictor, todo, _load, world, mutual_group)
    done, failed, errors, not_judged = [], [], [], {}  # records; (path, problem) x 2; error rows by path
    with journal_file(out_dir, world.rank if world.distributed else None).open("a", encoding="utf-8") as log:
        for scored in progress(stream, total=len(share), desc="predict"):
            if scored.error is not None:
                failed.append(_failure(scored))
                not_judged[str(scored.source.path)] = _error_row(scored.source, scored.error.problem)
                continue
            result = predictor.result(scored)
            if result.error is not None:
                errors.append((str(scored.source.path), result.error))
                not_judged[str(scored.source.path)] = _error_row(scored.source, result.error)
                continue
            files = save_outputs(out_dir, scored.source, scored.image, result, overlays)
            source = panel_threshold_source(predictor.thresholds)
            files += (save_panel_output(out_dir, scored.source, scored.image, result, source) if panels else "",)
            files += (save_raw_map(out_dir, scored.source, result) if raw_maps else "",)
            record = _record(scored.source, result, *files)
            record.update({"self_reference": True} if scored.reference_digest else {})  # in the journal only
            done.append(record)
            log.write(json_line(record) + "\n")
            log.flush()
    reports = world.gather((done, failed, errors, not_judged, [group.to_dict() for group in groups]))
    summary = None
    if world.is_main:
        done, failed, errors = ([item for report in reports for item in report[part]] for part in range(3))
        not_judged = {path: row for report in reports for path, row in report[3].items()}
        if world.distributed:
            merge_rank_journals(out_dir, done, world.size)
        for image in todo:  # an earlier result of a file scored again is outdated now
            records.pop(str(image.path), None)
        records.update((record["path"], record) for record in done)
        rows = sorted([*records.values(), *not_judged.values()], key=lambda row: row["key"])
        remove_stale_outputs(out_dir, earlier, rows)
        self_references = sum(bool(row.get("self_reference")) for row in rows)
        run = world.describe(predictor.model)
        run.update({"self_references": self_references} if predictor.references is not None else {})
        if predictor.mutual is not None:  # how many images scored each other, and how alike they look
            run["mutual_groups"] = [group for report in reports for group in report[4]]
        write_tables(out_dir, settings, rows, scan, run)
        summary = RunSummary(
            found=len(images),
            predicted=len(todo) - len(failed) - len(errors),
            skipped=len(images) - len(todo),
            failed=failed,
            errors=errors,
            anomalous=sum(row["pred_label"] == "anomalous" for row in rows),
            total_rows=len(rows),
            out_dir=out_dir,
            scan=scan,
            self_references=self_references,
            mutual_groups=run.get("mutual_groups", []),
        )
    return world.broadcast(summary)


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
    image_quantile: float = DEFAULT_IMAGE_QUANTILE,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
    progress: Progress = silent,
    world: World = LOCAL,
    mutual_group: str = "folder",
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
        check_groups(group_images(images, mutual_group))
    share, stream, _ = folder_share(predictor, images, _load, world, mutual_group)
    for scored in progress(stream, total=len(share), desc="calibrate"):
        if scored.error is not None:
            failed.append(_failure(scored))
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
        calibration = calib.calibrate_from_normal(scores, pixels, predictor.identity, image_quantile)
    return world.broadcast((calibration, failed, scan))
