"""A study's tables in the paper's layout, with the paper's numbers and our difference, and its figure.

Tables 4-6 (`Study.rows == "variants"`): one row per variant; per test dataset a pixel-level "(AUROC, PRO, F1)" and
an image-level "(AUROC, AP, F1)" cell (the paper's order), each followed by the paper's cell and ours - paper.
Table 9 (`rows == "datasets"`): one row per test dataset, image block then pixel block, with AVERAGE rows (the
paper's printed AVERAGE when the block holds all of its datasets). The paper's numbers come from
`paper_results.json` through `evaluation.paper_numbers` (its "studies"); a figure of the paper prints no numbers, so a
figure study shows ours only and says so.

With several seeds a cell is "mean ± std" (x100, sample standard deviation, `paper.seeds`); the difference
is mean - paper. study.csv and study.json hold every value at full precision, per seed.

What may be compared with the paper is decided in one place, `paper.comparability` (`Comparability`, made by
`compare_run` from the run's settings and test sets): every table here passes its `PaperStudy` through
`Comparability.paper_of` and prints `markdown_lines`; a run on random weights or the tiny backbone shows no paper
column and says why; the figure's title carries `label()`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vip2clip.data.registry import dataset_info
from vip2clip.evaluation.paper_numbers import PaperNumbers, difference, load_paper_numbers
from vip2clip.evaluation.reports import csv_number, csv_text, difference_triple, markdown_table, triple
from vip2clip.metrics import IMAGE_KEYS, METRIC_KEYS, PIXEL_KEYS
from vip2clip.paper.comparability import Comparability
from vip2clip.paper.seeds import mean_std, spread_cell
from vip2clip.paper.studies import Study, Variant
from vip2clip.paper.study_figure import write_figure
from vip2clip.utils.fileio import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from vip2clip.evaluation.paper_numbers import PaperStudy

BLOCKS = (("Pixel", "pixel", PIXEL_KEYS), ("Image", "image", IMAGE_KEYS))  # Tables 4-6 print pixel first
SAME = Comparability()  # a run whose numbers may all be compared with the paper
FIGURE_NOTE = "The paper's {} plots numbers its text does not print: this study shows ours only (no paper column)."


def _paper(study: Study, reference: PaperNumbers | None) -> PaperStudy | None:
    if reference is None:
        return None
    if study.rows == "tables":  # Tables 1-2 as one study: every dataset's row, for the CSV and the JSON
        tables = list(reference.main_tables(study.variants[0].key).values())
        values = {name: row for table in tables for name, row in table.variants[study.variants[0].key].values.items()}
        variant = replace(next(iter(tables[0].variants.values())), values=values)
        return replace(tables[0], table=" and ".join(t.table for t in tables), variants={variant.key: variant})
    return reference.studies.get(study.name)


def main_tables_markdown(
    study: Study, variant: Variant, *, results, reference: PaperNumbers, titles, comparison: Comparability = SAME
) -> list[str]:
    """Tables 1 and 2 (`Study.rows == "tables"`), each in Table 9's layout over the datasets it prints, its paper
    column as `comparison` allows; test sets of neither (a protocol of your own) follow without a paper column."""
    lines, printed = [], set()
    for table in reference.main_tables(variant.key).values():
        names = set(table.variants[variant.key].values)
        printed |= names
        ours = {variant.key: {t: runs for t, runs in results[variant.key].items() if t in names}}
        lines += [f"## {table.table}: {table.title}", ""]
        shown = comparison.paper_of(table)
        lines.append(
            datasets_table(study, variant, results=ours, paper=shown, titles=titles)
            if ours[variant.key]
            else "(none tested)"
        )
        lines.append("")
    others = {variant.key: {t: runs for t, runs in results[variant.key].items() if t not in printed}}
    if others[variant.key]:
        lines += [
            "## Other test sets",
            "",
            datasets_table(study, variant, results=others, paper=None, titles=titles),
            "",
        ]
    return lines


def _cells(values: Sequence[Mapping[str, float]], keys: Sequence[str]) -> str:
    return "(" + ", ".join(spread_cell([run[key] for run in values]) for key in keys) + ")"


def _means(values: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {key: mean_std([run[key] for run in values])[0] for key in METRIC_KEYS}


def _tests(study: Study, results: Mapping[str, Mapping[str, Any]], paper: PaperStudy | None = None) -> list[str]:
    """The tested datasets in the paper's order (where it has them), else in the order the protocol names them."""
    present = {test for per_test in results.values() for test in per_test}
    printed = [name for variant in (paper.variants.values() if paper else ()) for name in variant.values]
    order = list(dict.fromkeys([*printed, *study.datasets]))
    return [name for name in order if name in present]


def _paper_values(paper: PaperStudy | None, key: str, dataset: str) -> dict[str, float] | None:
    if paper is None or key not in paper.variants:
        return None
    return paper.values_for(key, dataset)


def variants_table(study: Study, variants: Sequence[Variant], *, results, paper: PaperStudy | None, titles) -> str:
    """Tables 4-6's layout (module docstring)."""
    tests = _tests(study, results, paper)
    header = ["Variant"]
    for test in tests:
        for name, _, keys in BLOCKS:
            header += [f"{titles(test)} {name.lower()} ({', '.join(_short(k) for k in keys)})"]
            header += ["paper", "ours - paper"] if paper else []
    rows = []
    for variant in variants:
        row = [variant.label]
        for test in tests:
            runs = results[variant.key].get(test, [])
            theirs = _paper_values(paper, variant.key, test)
            for _, _, keys in BLOCKS:
                row.append(_cells(runs, keys) if runs else "-")
                if paper:
                    block = {k: theirs[k] for k in keys} if theirs and all(k in theirs for k in keys) else None
                    row += [
                        triple(block, keys) if block else "-",
                        difference_triple(_means(runs), block, keys=keys) if runs else "-",
                    ]
        rows.append(row)
    return markdown_table(header, rows)


def _short(key: str) -> str:
    return {"auroc": "AUROC", "ap": "AP", "f1": "F1", "aupro": "PRO"}[key.split("_", 1)[1]]


def datasets_table(study: Study, variant: Variant, *, results, paper: PaperStudy | None, titles) -> str:
    """Table 9's layout: one row per test dataset, image block then pixel block, AVERAGE rows."""
    rows = []
    for task, block, keys in (
        ("Image-level (AUROC, AP, F1)", "image", IMAGE_KEYS),
        ("Pixel-level (AUROC, PRO, F1)", "pixel", PIXEL_KEYS),
    ):
        runs_of = results[variant.key]
        shown = [t for t in _tests(study, results, paper) if any(not math.isnan(_means(runs_of[t])[k]) for k in keys)]
        for position, test in enumerate(shown):
            runs = results[variant.key][test]
            theirs = _paper_values(paper, variant.key, test)
            block_values = {k: theirs[k] for k in keys} if theirs and all(k in theirs for k in keys) else None
            rows.append(
                [
                    task if position == 0 else "",
                    titles(test),
                    _cells(runs, keys),
                    *_paper_cells(paper, _means(runs), block_values, keys),
                ]
            )
        if shown:
            per_seed = [
                {k: _block_mean([results[variant.key][t][i] for t in shown], k) for k in keys}
                for i in range(len(results[variant.key][shown[0]]))
            ]
            theirs = paper.averages.get(block) if paper else None
            reported = (
                {name for name, v in paper.variant(variant.key).values.items() if v and keys[0] in v}
                if (paper and variant.key in paper.variants)
                else set()
            )
            complete = set(shown) == reported  # the printed AVERAGE is over exactly these datasets
            rows.append(
                [
                    "",
                    "AVERAGE",
                    _cells(per_seed, keys),
                    *_paper_cells(paper, _means_of(per_seed, keys), theirs if complete else None, keys),
                ]
            )
    header = ["Task", "Datasets", "ViP²-CLIP (ours)"] + (["paper", "ours - paper"] if paper else [])
    return markdown_table(header, rows)


def _block_mean(runs: Sequence[Mapping[str, float]], key: str) -> float:
    defined = [run[key] for run in runs if not math.isnan(run[key])]
    return sum(defined) / len(defined) if defined else math.nan


def _means_of(runs: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, float]:
    return {key: mean_std([run[key] for run in runs])[0] for key in keys}


def _paper_cells(paper, ours: Mapping[str, float], theirs: Mapping[str, float] | None, keys) -> list[str]:
    if paper is None:
        return []
    return [triple(theirs, keys) if theirs else "-", difference_triple(ours, theirs, keys=keys)]


def study_markdown(
    study: Study,
    variants,
    *,
    seeds,
    results,
    reference: PaperNumbers | None,
    titles,
    comparison: Comparability = SAME,
    notes: Sequence[str] = (),
) -> str:
    """study.md: the table(s), the scale and protocol, the paper's source, what is not comparable and why."""
    paper = comparison.paper_of(_paper(study, reference))
    lines = [f"# {study.reproduces}: {study.title}", ""]
    if study.rows == "tables":
        lines += main_tables_markdown(
            study, variants[0], results=results, reference=reference, titles=titles, comparison=comparison
        )
    elif study.rows == "datasets":
        lines.append(datasets_table(study, variants[0], results=results, paper=paper, titles=titles))
    else:
        lines.append(variants_table(study, variants, results=results, paper=paper, titles=titles))
    lines.append("")
    scale = (
        "x100"
        if len(seeds) == 1
        else f"mean ± sample standard deviation over the seeds {', '.join(map(str, seeds))}, x100"
    )
    lines.append(
        f"Ours: {scale}; '-': undefined or not reported. Protocol: "
        + "; ".join(
            f"train {' + '.join(titles(n) for n in d.train)} -> test {', '.join(titles(n) for n in d.tests)}"
            for d in study.protocol
        )
        + "."
    )
    if study.missing:
        names = ", ".join(dataset_info(name).title for name in study.missing)
        lines.append(f"Missing (no root given, not run): {names}.")
    if paper is not None:
        lines.append(
            f"Paper: {paper.table} of {paper_title(reference)}; ours - paper in points of the printed values."
            + (f" {paper.notes[0].upper()}{paper.notes[1:]}." if paper.notes else "")
        )
    elif study.reproduces.startswith("Fig"):
        lines.append(FIGURE_NOTE.format(study.reproduces))
    lines += comparison.markdown_lines(titles) + [f"Note: {note}." for note in notes]
    return "\n".join(lines) + "\n"


def paper_title(reference: PaperNumbers) -> str:
    """The paper's title and authors, without the list of tables `source` goes on with."""
    title, _, _ = reference.source.partition("),")
    return f"“{title})”" if title != reference.source else reference.source


def study_rows(study: Study, variants, *, seeds, results, paper: PaperStudy | None) -> list[list[Any]]:
    """study.csv: one row per variant, test dataset and metric."""
    rows = []
    for variant in variants:
        for test, runs in results[variant.key].items():
            theirs = _paper_values(paper, variant.key, test) or {}
            for key in METRIC_KEYS:
                values = [run[key] for run in runs]
                mean, std = mean_std(values)
                paper_value = theirs.get(key, math.nan)
                rows.append(
                    [
                        study.name,
                        variant.key,
                        test,
                        key,
                        csv_number(mean),
                        csv_number(std),
                        *(csv_number(v) for v in values),
                        csv_number(paper_value),
                        csv_number(mean - paper_value),
                    ]
                )
    return rows


def study_json(study: Study, variants, *, seeds, results, paper: PaperStudy | None, reference) -> dict[str, Any]:
    entries = []
    for variant in variants:
        datasets = {}
        for test, runs in results[variant.key].items():
            theirs = _paper_values(paper, variant.key, test)
            metrics = {
                key: dict(zip(("mean", "std"), mean_std([run[key] for run in runs]), strict=True))
                for key in METRIC_KEYS
            }
            datasets[test] = {
                "metrics": metrics,
                "per_seed": list(runs),
                "paper": theirs,
                "difference": difference(_means(runs), theirs, keys=METRIC_KEYS) if theirs else None,
            }
        entries.append(
            {
                "key": variant.key,
                "label": variant.label,
                "options": dict(variant.options),
                "test_options": dict(variant.test_options),
                "datasets": datasets,
            }
        )
    return {
        "study": study.name,
        "reproduces": study.reproduces,
        "title": study.title,
        "seeds": list(seeds),
        "metrics_scale": "fraction",
        "std": "sample standard deviation (n - 1); 0 for one seed",
        "protocol": [{"train": list(d.train), "tests": list(d.tests)} for d in study.protocol],
        "missing": list(study.missing),
        "paper": (
            {"table": paper.table, "notes": paper.notes, **reference.describe()}
            if paper
            else {"table": None, "note": FIGURE_NOTE.format(study.reproduces)}
        ),
        "variants": entries,
    }


def write_study(
    out_dir: str | Path,
    study: Study,
    *,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    results,
    titles,
    reference: PaperNumbers | None = None,
    comparison: Comparability = SAME,
    notes: Sequence[str] = (),
) -> dict[str, Path | str]:
    """study.md, study.csv, study.json and, for a figure study, figure.png and figure.csv in OUT; returns the paths
    (and "figure_note" when the PNG could not be drawn). `comparison` says what may be compared with the paper
    (`paper.comparability`; default: everything); `notes` are printed under the table and kept in the JSON."""
    out_dir = Path(out_dir)
    reference = reference or load_paper_numbers("paper")
    paper = comparison.paper_of(_paper(study, reference))
    header = [
        "study",
        "variant",
        "dataset",
        "metric",
        "mean",
        "std",
        *(f"seed_{s}" for s in seeds),
        "paper",
        "difference",
    ]
    written: dict[str, Path | str] = {
        "markdown": atomic_write_text(
            out_dir / "study.md",
            study_markdown(
                study,
                variants,
                seeds=seeds,
                results=results,
                reference=reference,
                titles=titles,
                comparison=comparison,
                notes=notes,
            ),
        ),
        "csv": atomic_write_text(
            out_dir / "study.csv",
            csv_text(header, study_rows(study, variants, seeds=seeds, results=results, paper=paper)),
        ),
        "json": atomic_write_json(
            out_dir / "study.json",
            {
                **study_json(study, variants, seeds=seeds, results=results, paper=paper, reference=reference),
                **({} if comparison.comparable else {"paper": {"table": None, "note": comparison.label()}}),
                "comparability": comparison.to_dict(),
                "notes": list(notes),
            },
        ),
    }
    if study.figure is not None:
        written.update(
            write_figure(
                out_dir, study, variants=variants, results=results, titles=titles, not_comparable=comparison.label()
            )
        )
    return written
