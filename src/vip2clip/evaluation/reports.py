"""Result tables in the paper's layout (markdown, x100 with one decimal) and in full precision (CSV, JSON).

Per dataset (`vip2clip test`): one row per class and a mean row, columns image AUROC / AP / F1 and pixel AUROC /
PRO / F1. Across datasets (`vip2clip benchmark`), the layout of the paper's Tables 1-2: an image-level block and a
pixel-level block, one row per dataset holding "(AUROC, AP, F1)" or "(AUROC, PRO, F1)", and an AVERAGE row per
block. A dataset whose block is entirely undefined (the medical image-only or pixel-only sets) is left out of that
block, as in Table 2. Undefined values are "-" in markdown, empty in CSV and null in JSON.

With a reference (`benchmark --reference paper`, `evaluation.paper_numbers`) the benchmark table gains the reference's
numbers and ours - reference per dataset and metric ("-" where the reference has none); the markdown difference
is that of the printed (rounded) values, so that it can be checked by eye; CSV and JSON keep full precision.
A dataset's results (`test --reference paper`, and each dataset of such a benchmark) gain the same per class
(the paper's Tables 10-21 for MVTec AD and VisA) and for the mean row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vip2clip.evaluation.paper_numbers import ClassComparison, PaperNumbers, difference
from vip2clip.evaluation.results import EvaluationResult, result_to_dict
from vip2clip.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS
from vip2clip.utils.fileio import atomic_write_json, atomic_write_text

CLASS_HEADER = ("Class", "Image AUROC", "Image AP", "Image F1", "Pixel AUROC", "Pixel PRO", "Pixel F1")
BLOCKS = (("Image-level (AUROC, AP, F1)", IMAGE_KEYS), ("Pixel-level (AUROC, PRO, F1)", PIXEL_KEYS))
UNDEFINED_NOTE = "'-': undefined for this data (one label only, or no masks); means skip undefined classes."


@dataclass(frozen=True)
class BenchmarkEntry:
    """One evaluated dataset of a benchmark: its display name and its result."""

    name: str
    result: EvaluationResult


def percent(value: float) -> str:
    """A metric fraction as the paper prints it: x100, one decimal; "-" when undefined."""
    return "-" if value is None or math.isnan(value) else f"{100.0 * value:.1f}"


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [_markdown_row(header), _markdown_row(["---"] * len(header))]
    lines += [_markdown_row(row) for row in rows]
    return "\n".join(lines)


def class_table_markdown(result: EvaluationResult, title: str | None = None, *, notes: Sequence[str] = ()) -> str:
    """Per-class markdown table with a Mean row (paper layout, x100); `notes` are printed above the table."""
    rows = [[c.name, *(percent(c.metrics[k]) for k in METRIC_KEYS)] for c in result.classes]
    rows.append(["**Mean**", *(f"**{percent(result.mean[k])}**" for k in METRIC_KEYS)])
    heading = f"## {title}\n\n" if title else ""
    heading += "".join(f"**Note:** {note}\n\n" for note in notes)
    undefined = any(cell.strip("*") == "-" for row in rows for cell in row[1:])  # the footnote only where it applies
    return f"{heading}{markdown_table(CLASS_HEADER, rows)}\n" + (f"\n{UNDEFINED_NOTE}\n" if undefined else "")


def triple(values: Mapping[str, float], keys: Sequence[str]) -> str:
    return "(" + ", ".join(percent(values[k]) for k in keys) + ")"


def block_average(entries: Sequence[BenchmarkEntry], keys: Sequence[str]) -> dict[str, float]:
    """Per metric, the mean over the datasets where it is defined (NaN when none)."""
    average = {}
    for key in keys:
        values = [e.result.mean[key] for e in entries if not math.isnan(e.result.mean[key])]
        average[key] = sum(values) / len(values) if values else math.nan
    return average


def _block_entries(entries: Sequence[BenchmarkEntry], keys: Sequence[str]) -> list[BenchmarkEntry]:
    return [e for e in entries if any(not math.isnan(e.result.mean[k]) for k in keys)]


def _printed_difference(ours: float, paper: float) -> str:
    """ "+0.3": printed ours - printed reference, "-" where either is missing."""
    ours_text, reference_text = percent(ours), percent(paper)
    if "-" in (ours_text, reference_text):
        return "-"
    return f"{round(float(ours_text) - float(reference_text), 1) or 0.0:+.1f}"  # no "-0.0"


def difference_triple(ours: Mapping[str, float], paper: Mapping[str, float] | None, *, keys: Sequence[str]) -> str:
    """ "(+0.3, -, -1.2)": printed ours - printed reference, "-" where either is missing."""
    if paper is None:
        return "-"
    return "(" + ", ".join(_printed_difference(ours[key], paper.get(key, math.nan)) for key in keys) + ")"


def comparison_cells(
    paper: PaperNumbers | None, ours: Mapping[str, float], *, theirs: Mapping[str, float] | None, keys: Sequence[str]
) -> list[str]:
    if paper is None:
        return []
    return [triple(theirs, keys) if theirs else "-", difference_triple(ours, theirs, keys=keys)]


def paper_values(paper: PaperNumbers, name: str, *, keys: Sequence[str]) -> dict[str, float] | None:
    """The reference's values of one block for a dataset (None: it does not report that block)."""
    row = paper.row_for(name)
    return {k: row.values[k] for k in keys} if row and all(k in row.values for k in keys) else None


def benchmark_table_markdown(
    entries: Sequence[BenchmarkEntry], *, method: str = "ViP²-CLIP", paper: PaperNumbers | None = None
) -> str:
    """The paper's Table 1/2 layout: Task | Datasets | C | METHOD, image block then pixel block, AVERAGE rows;
    with a reference, two more columns: its values and ours - reference (see the module docstring)."""
    rows = []
    for task, keys in BLOCKS:
        shown = _block_entries(entries, keys)
        for position, entry in enumerate(shown):
            theirs = paper_values(paper, entry.name, keys=keys) if paper else None
            rows.append(
                [
                    task if position == 0 else "",
                    entry.name,
                    str(len(entry.result.classes)),
                    triple(entry.result.mean, keys),
                    *comparison_cells(paper, entry.result.mean, theirs=theirs, keys=keys),
                ]
            )
        if shown:
            average = block_average(shown, keys)
            theirs = paper.block_average([e.name for e in shown], keys) if paper else None
            rows.append(
                ["", "AVERAGE", "-", triple(average, keys), *comparison_cells(paper, average, theirs=theirs, keys=keys)]
            )
    header = ("Task", "Datasets", "C", method) + ((paper.name, f"ours - {paper.name}") if paper else ())
    table = markdown_table(header, rows) + "\n"
    if paper:
        table += (
            f"\n{paper.name}: {paper.source} ({paper.protocol}). Differences in points of the printed "
            "values; '-': not reported there. The reference's AVERAGE is its printed one when the block holds "
            "exactly that table's datasets, else the mean of its values for these datasets.\n"
        )
    return table


def _paper_cells(ours: Mapping[str, float], theirs: Mapping[str, float] | None) -> list[str]:
    """Per metric "99.2 (-1.3)": the reference's value and printed ours - reference; "-" where it has none."""
    theirs = theirs or {}
    cells = []
    for k in METRIC_KEYS:
        known = not math.isnan(theirs.get(k, math.nan))
        cells.append(f"{percent(theirs[k])} ({_printed_difference(ours[k], theirs[k])})" if known else "-")
    return cells


def class_paper_markdown(result: EvaluationResult, paper: PaperNumbers, *, dataset: str) -> str:
    """The per-class comparison with `reference` of results.md (see the module docstring); dataset: its registry
    name, alias or title."""
    comparison = paper.compare_classes(dataset, [c.name for c in result.classes])
    heading = f"### Compared with the {paper.name}: {paper.method}"
    if comparison is None:
        return f"{heading}\n\nThe {paper.name} reports no numbers for this dataset.\n"
    rows = [[c.name, *_paper_cells(c.metrics, _class_values(comparison, c.name))] for c in result.classes]
    rows.append(["**Mean**", *_paper_cells(result.mean, comparison.mean)])
    mean_note = f"the Mean row's reference: {comparison.mean_source or 'none (not every class is in the paper)'}"
    return (
        f"{heading} ({', '.join(comparison.tables)})\n\n{markdown_table(CLASS_HEADER, rows)}\n\n"
        f"Cells: the {paper.name}'s value (ours - {paper.name}, in points of the printed values); '-': not "
        f"reported there, or (in the difference) undefined here; {mean_note}.\n"
    )


def _class_values(comparison: ClassComparison, name: str) -> dict[str, float] | None:
    row = comparison.classes.get(name)
    return row.values if row else None


def _class_paper_json(result: EvaluationResult, paper: PaperNumbers, comparison: ClassComparison | None) -> dict:
    """results.json's "reference": the reference's values and ours - reference per class and for the mean."""
    if comparison is None:
        return {**paper.describe(), "dataset": None}
    classes = []
    for c in result.classes:
        row = comparison.classes.get(c.name)
        values = row.values if row else {}
        gaps = {k: v for k, v in difference(c.metrics, values, keys=METRIC_KEYS).items() if k in values}
        source = {"printed_name": row.printed_name, "tables": row.tables} if row else {"tables": {}}
        classes.append({"name": c.name, **source, "values": values, "difference": gaps})
    mean = comparison.mean or {}
    gaps = {k: v for k, v in difference(result.mean, mean, keys=METRIC_KEYS).items() if k in mean}
    return {
        **paper.describe(),
        "dataset": comparison.dataset,
        "tables": comparison.tables,
        "classes": classes,
        "mean": {"source": comparison.mean_source, "values": mean, "difference": gaps},
    }


def csv_number(value: float) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def class_table_csv(result: EvaluationResult, comparison: ClassComparison | None = None) -> str:
    """Full-precision CSV (fractions, not x100): one row per class, then a "mean" row; with a reference's
    comparison, its values (reference_KEY) and ours - reference (difference_KEY)."""
    header = ("class", "n_normal", "n_anomalous", *METRIC_KEYS, "image_threshold", "pixel_threshold")
    if comparison is not None:
        header += (*(f"reference_{k}" for k in METRIC_KEYS), *(f"difference_{k}" for k in METRIC_KEYS))

    def cells(ours: Mapping[str, float], theirs: Mapping[str, float] | None) -> list[str]:
        if comparison is None:
            return []
        theirs, gaps = theirs or {}, difference(ours, theirs, keys=METRIC_KEYS)
        return [
            *(csv_number(theirs.get(k, math.nan)) for k in METRIC_KEYS),
            *(csv_number(gaps[k]) for k in METRIC_KEYS),
        ]

    rows = [
        [
            c.name,
            c.n_normal,
            c.n_anomalous,
            *(csv_number(c.metrics[k]) for k in METRIC_KEYS),
            csv_number(c.image_threshold),
            csv_number(c.pixel_threshold),
            *cells(c.metrics, comparison and _class_values(comparison, c.name)),
        ]
        for c in result.classes
    ]
    n_normal = sum(c.n_normal for c in result.classes)
    n_anomalous = sum(c.n_anomalous for c in result.classes)
    rows.append(
        [
            "mean",
            n_normal,
            n_anomalous,
            *(csv_number(result.mean[k]) for k in METRIC_KEYS),
            csv_number(result.image_threshold),
            csv_number(result.pixel_threshold),
            *cells(result.mean, comparison and comparison.mean),
        ]
    )
    return csv_text(header, rows)


def _paper_average(paper: PaperNumbers, entries: Sequence[BenchmarkEntry]) -> dict[str, float]:
    """The reference's AVERAGE row over the same datasets as ours, block by block (missing keys: none)."""
    average: dict[str, float] = {}
    for _, keys in BLOCKS:
        average.update(paper.block_average([e.name for e in _block_entries(entries, keys)], keys) or {})
    return average


def benchmark_csv(entries: Sequence[BenchmarkEntry], paper: PaperNumbers | None = None) -> str:
    """Full-precision CSV: one row per dataset (its mean over classes), then the block averages; with a
    reference, its table, its values (reference_KEY) and ours - reference (difference_KEY), fractions."""
    extra = ("reference_table", *(f"reference_{k}" for k in METRIC_KEYS), *(f"difference_{k}" for k in METRIC_KEYS))
    header = ("dataset", "n_classes", *METRIC_KEYS, *(extra if paper else ()))

    def cells(ours: Mapping[str, float], table: str, theirs: Mapping[str, float] | None) -> list[str]:
        if paper is None:
            return []
        theirs = theirs or {}
        gaps = difference(ours, theirs, keys=METRIC_KEYS)
        return [
            table,
            *(csv_number(theirs.get(k, math.nan)) for k in METRIC_KEYS),
            *(csv_number(gaps[k]) for k in METRIC_KEYS),
        ]

    rows = []
    for e in entries:
        row = paper.row_for(e.name) if paper else None
        rows.append(
            [
                e.name,
                len(e.result.classes),
                *(csv_number(e.result.mean[k]) for k in METRIC_KEYS),
                *cells(e.result.mean, row.table if row else "", row.values if row else None),
            ]
        )
    average = {
        **block_average(_block_entries(entries, IMAGE_KEYS), IMAGE_KEYS),
        **block_average(_block_entries(entries, PIXEL_KEYS), PIXEL_KEYS),
    }
    theirs = _paper_average(paper, entries) if paper else None
    rows.append(["AVERAGE", "", *(csv_number(average[k]) for k in METRIC_KEYS), *cells(average, "", theirs)])
    return csv_text(header, rows)


def write_results(
    out_dir: str | Path,
    result: EvaluationResult,
    *,
    context: Mapping[str, Any],
    title: str | None = None,
    notes: Sequence[str] = (),
    paper: PaperNumbers | None = None,
    dataset: str | None = None,
) -> dict[str, Path]:
    """Write results.md, results.csv and results.json (with `context`: config, checkpoint, dataset ...; `notes`
    go into the markdown and the JSON); with a reference, its numbers for `dataset` (a registry name, alias or
    title) per class and for the mean, and our differences to them."""
    out_dir = Path(out_dir)
    data = {**context, "notes": list(notes), "metrics_scale": "fraction (markdown: x100)", **result_to_dict(result)}
    markdown = class_table_markdown(result, title, notes=notes)
    comparison = None
    if paper is not None:
        comparison = paper.compare_classes(dataset or title or "", [c.name for c in result.classes])
        markdown += "\n" + class_paper_markdown(result, paper, dataset=dataset or title or "")
        data["reference"] = _class_paper_json(result, paper, comparison)
    return {
        "markdown": atomic_write_text(out_dir / "results.md", markdown),
        "csv": atomic_write_text(out_dir / "results.csv", class_table_csv(result, comparison)),
        "json": atomic_write_json(out_dir / "results.json", data),
    }


def _paper_json(paper: PaperNumbers, entries: Sequence[BenchmarkEntry]) -> dict[str, Any]:
    """benchmark.json's "reference": where the numbers come from, per dataset and per block average."""
    datasets = []
    for e in entries:
        row = paper.row_for(e.name)
        values = row.values if row else {}
        gaps = {k: v for k, v in difference(e.result.mean, values, keys=METRIC_KEYS).items() if k in values}
        source = {"table": row.table, "printed_name": row.printed_name} if row else {"table": None}
        datasets.append({"name": e.name, **source, "values": values, "difference": gaps})
    average = {}
    for task, keys in BLOCKS:
        shown = _block_entries(entries, keys)
        theirs = paper.block_average([e.name for e in shown], keys)
        average[task] = theirs and {
            "values": theirs,
            "difference": difference(block_average(shown, keys), theirs, keys=keys),
        }
    return {**paper.describe(), "metrics_scale": "fraction", "datasets": datasets, "average": average}


def write_benchmark(
    out_dir: str | Path,
    entries: Sequence[BenchmarkEntry],
    *,
    context: Mapping[str, Any],
    method: str = "ViP²-CLIP",
    paper: PaperNumbers | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write benchmark.md, benchmark.csv and benchmark.json (per-dataset means, block averages, `context`, and
    the reference's numbers and our differences when one is given); `notes` go above the markdown table and into
    the JSON."""
    out_dir = Path(out_dir)
    averages = {task: block_average(_block_entries(entries, keys), keys) for task, keys in BLOCKS}
    data = {
        **context,
        "metrics_scale": "fraction (markdown: x100)",
        "datasets": [{"name": e.name, "n_classes": len(e.result.classes), "mean": e.result.mean} for e in entries],
        "average": averages,
        "notes": list(notes),
    }
    if paper is not None:
        data["reference"] = _paper_json(paper, entries)
    return {
        "markdown": atomic_write_text(
            out_dir / "benchmark.md",
            "".join(f"**Note:** {note}\n\n" for note in notes)
            + benchmark_table_markdown(entries, method=method, paper=paper),
        ),
        "csv": atomic_write_text(out_dir / "benchmark.csv", benchmark_csv(entries, paper)),
        "json": atomic_write_json(out_dir / "benchmark.json", data),
    }


def write_scores(path: str | Path, result: EvaluationResult) -> Path:
    """scores.csv: one row per evaluated image in dataset order (class, image path as in the index, label,
    pred_score at full precision), so that runs can be compared image by image."""
    rows = [[name, image, label, repr(score)] for name, image, label, score in result.image_scores]
    return atomic_write_text(path, csv_text(("class", "image", "label", "pred_score"), rows))
