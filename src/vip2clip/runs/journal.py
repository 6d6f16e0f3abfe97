"""The journal of `vip2clip predict` (OUT/predictions.jsonl) and the rules of a result set.

A settings line (the model's identity, thresholds, overlay switch, inputs), then one line per judged image (its
row plus the file's size and mtime), appended as images finish. `start_journal` decides what an earlier run in
OUT is worth: the same settings and inputs resume it (records of files no longer found are dropped), anything
else is refused unless `overwrite` starts a new result set (or the earlier run stopped before it judged any image:
then there is nothing to protect). See `vip2clip.runs.folder_run`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vip2clip.data.files import InputImage
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.utils.fileio import atomic_write_text, json_line

logger = logging.getLogger(__name__)

JOURNAL = "predictions.jsonl"


RANK_JOURNALS = "predictions.rank*.jsonl"


def journal_file(out_dir: Path, rank: int | None = None) -> Path:
    """OUT/predictions.jsonl; with `rank` (a run under torchrun) that rank's journal, which rank 0 merges into it at
    the end of the run (or the next run does, when the run was stopped)."""
    return out_dir / (JOURNAL if rank is None else RANK_JOURNALS.replace("*", str(rank)))


OUTPUT_FILES = ("pred_mask", "overlay", "panel", "anomaly_map")  # the columns that name an image's files in OUT


def read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(settings, records by absolute path) from a journal; a line cut short by a crash is ignored."""
    settings, records = None, {}
    if not path.is_file():
        return settings, records
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: ignoring unreadable line %d (interrupted write?)", path, number + 1)
            continue
        if number == 0 and "settings" in entry:
            settings = entry["settings"]
        elif isinstance(entry, dict) and "path" in entry:
            records[entry["path"]] = entry
    return settings, records


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings that differ; the model by its identity (paths and wording do not count)."""
    ignored = {"thresholds_source", "model"}
    changed = sorted(key for key in set(old) | set(new) if key not in ignored and old.get(key) != new.get(key))
    if not isinstance(old.get("model"), dict):
        return ["model", *changed]
    identities = [PredictorIdentity.from_dict(settings["model"]) for settings in (old, new)]
    return [*identities[0].mismatches(identities[1]), *changed]


def is_done(image: InputImage, record: dict[str, Any] | None, *, out_dir: Path) -> bool:
    """True when `record` still describes the image: same size and mtime, and its outputs are on disk."""
    if record is None:
        return False
    try:
        stat = image.path.stat()
    except OSError:  # vanished since the walk: let the loader report it
        return False
    outputs = [record["pred_mask"]] + [record[kind] for kind in OUTPUT_FILES[1:] if record.get(kind)]
    return (
        record.get("file_size") == stat.st_size
        and record.get("file_mtime_ns") == stat.st_mtime_ns
        and all((out_dir / name).is_file() for name in outputs)
    )


def _refusal(out_dir: Path, differences: list[str]) -> ValueError:
    if differences == ["inputs"]:
        what = "other inputs (the paths given differ)"
    else:
        what = f"other settings ({', '.join(differences)} differ)"
    return ValueError(
        f"{out_dir} holds predictions of {what}; pass --overwrite to start a new result set there (the earlier "
        "results are removed), or choose another --out"
    )


def start_journal(
    out_dir: Path, settings: dict, *, overwrite: bool, images: list[InputImage]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Check the earlier run's settings and inputs, then rewrite the journal compactly with the records of the
    images found now. Returns (records kept, earlier records: their files are removed unless reused)."""
    journal = out_dir / JOURNAL
    old_settings, earlier = read_journal(journal)
    leftovers = sorted(out_dir.glob(RANK_JOURNALS))  # of a stopped run under torchrun
    for leftover in leftovers:  # records made under the settings of the journal's first line
        earlier.update(read_journal(leftover)[1])
    # a run stopped before it judged an image (no record, no tables) holds nothing to protect
    holds_results = bool(earlier) or (out_dir / "predictions.csv").is_file()
    if old_settings is not None and holds_results and not overwrite and _differences(old_settings, settings):
        raise _refusal(out_dir, _differences(old_settings, settings))
    current = {str(image.path) for image in images}
    records = {} if overwrite else {path: record for path, record in earlier.items() if path in current}
    lines = [json_line({"settings": settings})] + [json_line(record) for record in records.values()]
    atomic_write_text(journal, "\n".join(lines) + "\n")
    for leftover in leftovers:
        leftover.unlink()
    return records, earlier


def merge_rank_journals(out_dir: Path, records: list[dict[str, Any]], *, ranks: int) -> None:
    """Append the records every rank journaled (gathered by rank 0) to the journal, then remove the rank journals."""
    with journal_file(out_dir).open("a", encoding="utf-8") as journal:
        journal.writelines(json_line(record) + "\n" for record in records)
    for rank in range(ranks):
        journal_file(out_dir, rank).unlink(missing_ok=True)


def remove_stale_outputs(out_dir: Path, *, earlier: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Delete the mask/overlay/panel files of earlier records that no current row uses (deleted, unreadable, redone
    under another key, or replaced by a new result set)."""
    used = {row.get(column) for row in rows for column in OUTPUT_FILES} - {None, ""}
    stale = {record.get(column) for record in earlier.values() for column in OUTPUT_FILES}
    for name in sorted(name for name in stale - used if name and not Path(name).is_absolute()):
        if ".." not in Path(name).parts:  # only files inside OUT, whatever a journal says
            (out_dir / name).unlink(missing_ok=True)


def output_name(key: str) -> str:
    """ "good/a.jpg" -> "good/a_jpg.png": the suffix joins the stem so that a.jpg and a.png stay apart."""
    path = Path(key)
    suffix = path.suffix.lstrip(".").lower()
    return (path.with_name(f"{path.stem}_{suffix}" if suffix else path.name)).as_posix() + ".png"


def _unique_key(key: str, taken: set[str]) -> str:
    """`key`, or "stem~2.ext", "stem~3.ext"... if another image already has that key."""
    path, number, candidate = Path(key), 2, key
    while candidate in taken:
        candidate = path.with_name(f"{path.stem}~{number}{path.suffix}").as_posix()
        number += 1
    return candidate


def assign_keys(todo: list[InputImage], records: dict[str, dict[str, Any]]) -> list[InputImage]:
    """Give each image to redo a key no other image (of this run or kept from earlier runs) uses."""
    redo = {str(image.path) for image in todo}
    taken = {record["key"] for path, record in records.items() if path not in redo}
    assigned = []
    for image in todo:
        key = _unique_key(image.key, taken)
        taken.add(key)
        assigned.append(InputImage(image.path, key))
    return assigned
