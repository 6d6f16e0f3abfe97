"""`vip2clip predict` and `vip2clip calibrate` on files and folders: resumable outputs, streamed calibration.

Images are found by `vip2clip.data.files.scan_images` (masks skipped, unreadable folders listed) and scored by
`Predictor.score`, the one batching path.

Layout of OUT (predict):
- `predictions.csv` / `predictions.json`: one row per image found in THIS run, in key order (path, pred_score,
  pred_label, max_pixel_score, defect_area at the pixel threshold, width, height, pred_mask, overlay and panel
  files, error). pred_label is the word "normal", "anomalous" or "error" (`ImageItem.verdict`; in memory
  `ImageItem.pred_label` is anomalib's boolean): a file that could not be read, is too small or thin
  to judge (`vip2clip.inference.judgeable`), or whose score or map is NaN/infinite (fail closed), has an "error" row
  with the reason and no numbers. The JSON also holds the settings (the model's identity, thresholds, the inputs,
  the computation: engine and precision), the rows that could not be judged ("failed") and what
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
tables, rows as in one process. `calibrate` runs live in `vip2clip.runs.folder_calibrate`.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vip2clip.data.files import ImageScan, InputImage, no_images_error, scan_images
from vip2clip.data.images import load_image
from vip2clip.inference.predictor import Predictor
from vip2clip.outputs import ANOMALOUS, ERROR, ImageItem
from vip2clip.runs.grouping import check_groups, folder_share, group_images, whole_groups
from vip2clip.runs.journal import (
    assign_keys,
    is_done,
    journal_file,
    merge_rank_journals,
    remove_stale_outputs,
    start_journal,
)
from vip2clip.runs.run_outputs import panel_threshold_source, save_outputs, save_panel_output, save_raw_map
from vip2clip.scoring.mutual_rule import DEFAULT_GROUP
from vip2clip.utils.distributed import World
from vip2clip.utils.fileio import atomic_write_json, atomic_write_text, json_line
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "path",
    "pred_score",
    "pred_label",
    "max_pixel_score",
    "defect_area",
    "width",
    "height",
    "pred_mask",
    "overlay",
    "panel",
    "anomaly_map",
    "error",
)


@dataclass(kw_only=True)
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


def load_input(image: InputImage) -> Image.Image:
    """The decoded RGB image of a found file (BadImageError naming it when it cannot be read)."""
    return load_image(image.path)


def unreadable(scored: ImageItem) -> tuple[str, str]:
    """(path, problem) of a found file that could not be read (or is too small or thin to judge), logged."""
    logger.warning("not judging %s: %s", scored.source.path, scored.error)
    return str(scored.source.path), scored.error


@dataclass(frozen=True)
class OutputOptions:
    """What a predict run writes beside the tables and masks: heat-map overlays, panels, raw maps (float16 .npy)."""

    overlays: bool = True
    panels: bool = False
    raw_maps: bool = False


def run_settings(
    predictor: Predictor,
    options: OutputOptions,
    *,
    inputs: Sequence[str | Path] = (),
    mutual_group: str = DEFAULT_GROUP,
) -> dict[str, Any]:
    """What decides the outputs: the model's identity (with tiling and the references' rule), the thresholds, the
    overlay switch, the inputs (the paths given, absolute and sorted), and the panel and raw-map switches and
    which reference images, the last ones only when used."""
    settings = {
        "model": predictor.identity.to_dict(),
        "image_threshold": predictor.thresholds.image,
        "pixel_threshold": predictor.thresholds.pixel,
        "thresholds_source": predictor.thresholds.source,
        "overlays": options.overlays,
        "inputs": sorted({str(Path(path).resolve()) for path in inputs}),
        # fp32 torch, bf16 torch and an INT8 file give other numbers: one folder holds one of them (resume refuses)
        "computation": {key: value for key, value in predictor.computation.items() if key != "why"},
    }
    switches = {"panels": options.panels, "raw_maps": options.raw_maps}
    settings.update({name: True for name, used in switches.items() if used})  # absent when off: see above
    if predictor.references is not None:
        settings["references_sha256"] = predictor.references.record()["sha256"]
    if predictor.mutual is not None:
        settings["mutual_group"] = mutual_group
    return settings


def _record(
    image: InputImage, result: ImageItem, *, mask: str, overlay: str, panel: str = "", raw_map: str = ""
) -> dict[str, Any]:
    stat = image.path.stat()
    width, height = result.size
    return {
        "path": str(image.path),
        "key": image.key,
        "pred_score": result.pred_score,
        "pred_label": result.verdict,  # the word, as files have always said it
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
    no_files = dict.fromkeys(("pred_mask", "overlay", "panel", "anomaly_map"), "")
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, None)
    return {**row, **no_files, "path": str(image.path), "key": image.key, "pred_label": ERROR, "error": problem}


def write_tables(
    out_dir: Path, *, settings: dict, rows: list[dict], scan: ImageScan | None = None, run: dict | None = None
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


@dataclass(kw_only=True)
class _Plan:
    """What rank 0 decides before scoring: the search, the run's settings, the journal's records (kept, and
    earlier ones whose files may go) and the images to score (with their output keys)."""

    scan: ImageScan
    settings: dict[str, Any]
    records: dict[str, dict[str, Any]]
    earlier: dict[str, dict[str, Any]]
    todo: list[InputImage]


@dataclass(kw_only=True)
class _ShareReport:
    """What a rank sends rank 0: its journal records, its unreadable files and not-finite outputs (path,
    problem), its error rows by path and its mutual groups' reports."""

    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    not_judged: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)


def predict_folder(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    out_dir: str | Path,
    overwrite: bool = False,
    options: OutputOptions = OutputOptions(),
    run: RunContext = LOCAL_RUN,
    mutual_group: str = DEFAULT_GROUP,
) -> RunSummary:
    """Predict every image in `paths` (files or folders, recursive) into `out_dir`; see the module docstring.
    With `predictor.mutual`, the images of each group (`grouping.group_images`) score each other.

    Unreadable files and images whose model output is not finite get "error" rows, are listed in the summary
    and never stop the run (`RunSummary.complete` is False then).
    """
    out_dir, world = Path(out_dir), run.world
    where = {"out_dir": out_dir, "options": options, "mutual_group": mutual_group}
    plan = _plan(predictor, paths, overwrite=overwrite, **where) if world.is_main else None
    todo = world.broadcast(None if plan is None else plan.todo)  # one search and journal check, shared
    reports = world.gather(_score_share(predictor, todo, run=run, **where))
    summary = _finish(predictor, plan, reports=reports, out_dir=out_dir, world=world) if world.is_main else None
    return world.broadcast(summary)


def _plan(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    out_dir: Path,
    overwrite: bool,
    options: OutputOptions,
    mutual_group: str,
) -> _Plan:
    """Search `paths`, check and rewrite the journal (refusing other settings unless `overwrite`), and choose the
    images to score: those not done, whole mutual groups."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file; --out must be a folder (new, or one of an earlier predict run)")
    scan = scan_images(paths, exclude=out_dir)
    if not scan.images:
        raise no_images_error(paths, scan)
    if predictor.mutual is not None:  # refused before anything is written: no journal blocks the corrected run
        check_groups(group_images(scan.images, mutual_group), mutual_group)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(predictor, options, inputs=paths, mutual_group=mutual_group)
    records, earlier = start_journal(out_dir, settings, overwrite=overwrite, images=scan.images)
    todo = [image for image in scan.images if not is_done(image, records.get(str(image.path)), out_dir=out_dir)]
    if predictor.mutual is not None:  # a group is scored whole: the resumed ones again with the rest
        todo = whole_groups(todo, scan.images, by=mutual_group)
    return _Plan(scan=scan, settings=settings, records=records, earlier=earlier, todo=assign_keys(todo, records))


def _score_share(
    predictor: Predictor,
    todo: list[InputImage],
    *,
    out_dir: Path,
    options: OutputOptions,
    run: RunContext,
    mutual_group: str,
) -> _ShareReport:
    """Score this rank's share of `todo`, write each judged image's files, then its journal line (so that a killed
    run loses at most the image in progress)."""
    world = run.world
    share, stream, groups = folder_share(predictor, todo, load=load_input, world=world, by=mutual_group)
    report = _ShareReport()
    with journal_file(out_dir, world.rank if world.distributed else None).open("a", encoding="utf-8") as log:
        for scored in run.progress(stream, total=len(share), desc="predict"):
            if scored.error is not None:
                report.failed.append(unreadable(scored))
                report.not_judged[str(scored.source.path)] = _error_row(scored.source, scored.error)
                continue
            result = predictor.result(scored)
            if result.error is not None:
                report.errors.append((str(scored.source.path), result.error))
                report.not_judged[str(scored.source.path)] = _error_row(scored.source, result.error)
                continue
            record = _write_outputs(predictor, out_dir, image=scored.source, result=result, options=options)
            report.done.append(record)
            log.write(json_line(record) + "\n")
            log.flush()
    report.groups = [group.to_dict() for group in groups]
    return report


def _write_outputs(
    predictor: Predictor, out_dir: Path, *, image: InputImage, result: ImageItem, options: OutputOptions
) -> dict[str, Any]:
    """Write a judged image's mask (and overlay, panel, raw map as asked); its journal record."""
    mask, overlay = save_outputs(out_dir, image, rgb=result.image, result=result, overlays=options.overlays)
    source = panel_threshold_source(predictor.thresholds)
    panel = save_panel_output(out_dir, image, rgb=result.image, result=result, source=source) if options.panels else ""
    raw_map = save_raw_map(out_dir, image, result=result) if options.raw_maps else ""
    record = _record(image, result, mask=mask, overlay=overlay, panel=panel, raw_map=raw_map)
    record.update({"self_reference": True} if result.self_reference else {})  # in the journal only
    return record


def _finish(
    predictor: Predictor, plan: _Plan, *, reports: list[_ShareReport], out_dir: Path, world: World
) -> RunSummary:
    """Rank 0: merge the ranks' journals and records into the tables of every image found, remove outputs of
    images no longer there, and summarise."""
    done = [record for report in reports for record in report.done]
    failed = [item for report in reports for item in report.failed]
    errors = [item for report in reports for item in report.errors]
    not_judged = {path: row for report in reports for path, row in report.not_judged.items()}
    if world.distributed:
        merge_rank_journals(out_dir, done, ranks=world.size)
    records = dict(plan.records)
    for image in plan.todo:  # an earlier result of a file scored again is outdated now
        records.pop(str(image.path), None)
    records.update((record["path"], record) for record in done)
    rows = sorted([*records.values(), *not_judged.values()], key=lambda row: row["key"])
    remove_stale_outputs(out_dir, earlier=plan.earlier, rows=rows)
    self_references = sum(bool(row.get("self_reference")) for row in rows)
    run = world.describe(predictor.model) | {"computation": predictor.computation}
    run.update({"self_references": self_references} if predictor.references is not None else {})
    if predictor.mutual is not None:  # how many images scored each other, and how alike they look
        run["mutual_groups"] = [group for report in reports for group in report.groups]
    write_tables(out_dir, settings=plan.settings, rows=rows, scan=plan.scan, run=run)
    return RunSummary(
        found=len(plan.scan.images),
        predicted=len(plan.todo) - len(failed) - len(errors),
        skipped=len(plan.scan.images) - len(plan.todo),
        failed=failed,
        errors=errors,
        anomalous=sum(row["pred_label"] == ANOMALOUS for row in rows),
        total_rows=len(rows),
        out_dir=out_dir,
        scan=plan.scan,
        self_references=self_references,
        mutual_groups=run.get("mutual_groups", []),
    )
