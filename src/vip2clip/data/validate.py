"""`vip2clip validate`: check an index (ours, or one written by the AnomalyCLIP / ViP²-CLIP scripts) against disk.

Problems (exit code 1): missing image or mask files, unreadable files, a mask whose size differs from its
image's, and the index problems below. Notes (reported, not failures): an image in both splits, an anomalous image
whose mask has no defect pixel.
By default every file is decoded (a truncated file has a valid header); `decode=False` reads headers only.

Index problems (`index_problems`, cheap: no image is decoded): the same image listed twice in a split, a relative
path that leaves the dataset root (`../outside.png`), a row listed under one class with another `cls_name`, a
normal row whose mask marks defect pixels. `test`, `benchmark` and `train` refuse an index with any of them
(`check_index`, called by `vip2clip.data.registry.resolve_index`): repairing silently would change what is counted
(a duplicated row counted twice moves the AUROC), and guessing which of two contradicting fields is right is the
user's call, not ours.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vip2clip.data.images import BadImageError, image_size, load_image, load_mask
from vip2clip.data.index import INDEX_NAME, DatasetIndex, Sample, read_index


@dataclass(frozen=True)
class Finding:
    """One problem or note: what kind, where in the index, and the file it concerns."""

    kind: str
    where: str  # split/class[position]
    path: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.kind}: {self.path} ({self.where}){': ' + self.detail if self.detail else ''}"


@dataclass
class ValidationReport:
    source: str
    counts: dict[str, int] = field(default_factory=dict)  # split -> samples
    problems: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        sizes = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        head = f"{self.source}: {sum(self.counts.values())} samples ({sizes})"
        body = [f"problem {finding.line()}" for finding in self.problems]
        body += [f"note {finding.line()}" for finding in self.notes]
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        return [head, *body, f"{verdict}, {len(self.notes)} note(s)"]


def _entries(index: DatasetIndex) -> Iterator[tuple[str, Sample]]:
    for split, by_class in index.splits.items():
        for cls_key, samples in by_class.items():
            for position, sample in enumerate(samples):
                yield f"{split}/{cls_key}[{position}]", sample


def _check_sample(index: DatasetIndex, where: str, sample: Sample, decode: bool) -> list[Finding]:
    """File-level checks of one sample (existence, readability, mask size, empty mask)."""
    image_path = index.resolve(sample.img_path)
    mask_path = index.resolve(sample.mask_path) if sample.mask_path else None
    findings = []
    if not image_path.is_file():
        findings.append(Finding("missing image", where, str(image_path)))
    if mask_path is not None and not mask_path.is_file():
        findings.append(Finding("missing mask", where, str(mask_path)))
    if findings:
        return findings
    try:
        size = load_image(image_path).size if decode else image_size(image_path)
    except BadImageError as error:
        return [Finding("unreadable image", where, str(image_path), error.problem)]
    if mask_path is None:
        return []
    try:
        mask = load_mask(mask_path) if decode else None
        mask_size = (mask.shape[1], mask.shape[0]) if mask is not None else image_size(mask_path)
    except BadImageError as error:
        return [Finding("unreadable mask", where, str(mask_path), error.problem)]
    if mask_size != size:
        detail = f"mask is {mask_size[0]}x{mask_size[1]}, image {size[0]}x{size[1]}"
        return [Finding("size mismatch", where, str(mask_path), detail)]
    if mask is not None and not mask.any():
        return [Finding("empty mask", where, str(mask_path), "anomalous image whose mask has no defect pixel")]
    return []


def _duplicates(index: DatasetIndex) -> tuple[list[Finding], list[Finding]]:
    """(same image twice in one split: problems, same image in two splits: notes)."""
    first_seen: dict[tuple[str, Path], str] = {}
    splits_of: dict[Path, str] = {}
    problems, notes = [], []
    for where, sample in _entries(index):
        split = where.split("/", 1)[0]
        path = Path(os.path.normpath(index.resolve(sample.img_path)))
        if (split, path) in first_seen:
            problems.append(Finding("duplicate entry", where, str(path), f"also at {first_seen[split, path]}"))
            continue
        first_seen[split, path] = where
        if path in splits_of and splits_of[path] != split:
            notes.append(Finding("in two splits", where, str(path), f"also in {splits_of[path]}"))
        splits_of.setdefault(path, split)
    return problems, notes


def _leaves_root(path: str) -> bool:
    """A relative index path that points outside the dataset root once `..` is resolved."""
    if not path or PurePosixPath(path).is_absolute() or Path(path).is_absolute():
        return False
    return posixpath.normpath(path).split("/", 1)[0] == ".."


def _row_problems(index: DatasetIndex) -> Iterator[Finding]:
    """Paths leaving the root and rows listed under another class than their cls_name."""
    for where, sample in _entries(index):
        for kind, path in (("image", sample.img_path), ("mask", sample.mask_path)):
            if _leaves_root(path):
                yield Finding("outside the root", where, path, f"the {kind} path leaves the dataset root {index.root}")
        cls_key = where.split("/", 1)[1].rsplit("[", 1)[0]
        if sample.cls_name != cls_key:
            yield Finding(
                "class mismatch", where, sample.img_path, f"listed under {cls_key!r}, cls_name is {sample.cls_name!r}"
            )


def _defect_masks_of_normal_rows(index: DatasetIndex) -> Iterator[Finding]:
    for dropped in index.dropped_masks:
        mask_path = index.resolve(dropped.mask_path)
        try:
            defect = mask_path.is_file() and bool(load_mask(mask_path).any())
        except BadImageError:
            defect = False  # an unreadable mask of a normal row is not used: nothing contradicts the label
        if defect:
            yield Finding(
                "defect mask on a normal row",
                dropped.where,
                str(mask_path),
                f"the row of {dropped.img_path} says anomaly 0 but its mask marks defect pixels",
            )


def index_problems(index: DatasetIndex) -> tuple[list[Finding], list[Finding]]:
    """(problems, notes) of the index itself (see the module docstring); no image is decoded."""
    problems, notes = _duplicates(index)
    problems += [*_row_problems(index), *_defect_masks_of_normal_rows(index)]
    return problems, notes


class IndexProblemsError(ValueError):
    """An index that `test`, `benchmark` and `train` refuse; the message lists the problems."""


def check_index(index: DatasetIndex, listed: int = 10) -> None:
    """IndexProblemsError naming the index file and its problems (`index_problems`), else nothing."""
    problems, _ = index_problems(index)
    if not problems:
        return
    lines = [f"  {finding.line()}" for finding in problems[:listed]]
    if len(problems) > listed:
        lines.append(f"  ... and {len(problems) - listed} more")
    raise IndexProblemsError(
        f"{index.root / INDEX_NAME}: {len(problems)} problem(s) in the index, refused (counting or guessing past "
        f"them would change the results):\n" + "\n".join(lines) + f"\nfix the index (`vip2clip validate "
        f"{index.root}` checks it; `vip2clip convert` rewrites it from the folders)"
    )


def validate_index(index: DatasetIndex, *, decode: bool = True, workers: int = 4) -> ValidationReport:
    """Check every sample of every split against the files under `index.root`."""
    report = ValidationReport(
        source=str(index.root / INDEX_NAME),
        counts={split: sum(len(s) for s in by_class.values()) for split, by_class in index.splits.items()},
    )
    entries = list(_entries(index))
    # Decoding is I/O and C code that releases the GIL: a few threads keep the disk and cores busy.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda entry: _check_sample(index, entry[0], entry[1], decode), entries)
        for findings in results:
            for finding in findings:
                (report.notes if finding.kind == "empty mask" else report.problems).append(finding)
    problems, notes = index_problems(index)
    report.problems += problems
    report.notes += notes
    return report


def validate_path(path: str | Path, decode: bool = True) -> ValidationReport:
    """Validate the meta.json at `path` (or in the folder `path`). A malformed file is a single problem."""
    try:
        index = read_index(path)  # a missing file raises FileNotFoundError: a usage error, not a finding
    except ValueError as error:
        report = ValidationReport(source=str(path))
        report.problems.append(Finding("malformed index", "-", str(path), str(error)))
        return report
    return validate_index(index, decode=decode)
