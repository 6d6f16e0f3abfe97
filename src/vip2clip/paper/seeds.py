"""Several training seeds of one protocol: mean and standard deviation per cell, so that a gap to the paper can be
told from seed noise.

`benchmark --seeds 111 112 113` trains one model per seed (OUT/seed-N/, each a complete benchmark folder) and
writes OUT/benchmark.{md,csv,json} with, per dataset and metric, the mean over the seeds and the sample standard
deviation (n - 1 in the denominator; 0 for one seed). The markdown prints "mean ± std" x100 with one decimal; the
reference columns compare the mean. A metric undefined for a dataset (NaN) is undefined in every seed's run
(definedness follows from the data, not the weights) and stays "-".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vip2clip.evaluation.paper_numbers import PaperNumbers
from vip2clip.evaluation.reports import (
    BLOCKS,
    BenchmarkEntry,
    block_average,
    comparison_cells,
    csv_number,
    csv_text,
    markdown_table,
    paper_values,
    percent,
)
from vip2clip.metrics import METRIC_KEYS
from vip2clip.utils.fileio import atomic_write_json, atomic_write_text

STD_NOTE = "mean ± sample standard deviation over the seeds {}, x100"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of the defined values; NaN when none is defined, std 0 for one."""
    defined = [value for value in values if not math.isnan(value)]
    if not defined:
        return math.nan, math.nan
    return statistics.fmean(defined), statistics.stdev(defined) if len(defined) > 1 else 0.0


def spread_cell(values: Sequence[float]) -> str:
    """ "91.2 ± 0.3" (x100, one decimal); "91.2" for one value; "-" when undefined."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return percent(mean) if len(values) == 1 else f"{percent(mean)} ± {percent(std)}"


def _per_seed(runs: Mapping[int, Sequence[BenchmarkEntry]]) -> list[tuple[str, int, dict[str, list[float]]]]:
    """Per dataset (in the runs' order): name, classes, and per metric the values of every seed."""
    first = next(iter(runs.values()))
    rows = []
    for position, entry in enumerate(first):
        values = {key: [run[position].result.mean[key] for run in runs.values()] for key in METRIC_KEYS}
        rows.append((entry.name, len(entry.result.classes), values))
    return rows


def _block_averages(runs: Mapping[int, Sequence[BenchmarkEntry]], keys: Sequence[str]) -> dict[str, list[float]]:
    """Per metric, each seed's block AVERAGE (the mean over the datasets where the block is defined)."""
    per_seed = [
        block_average([e for e in run if any(not math.isnan(e.result.mean[k]) for k in keys)], keys)
        for run in runs.values()
    ]
    return {key: [average[key] for average in per_seed] for key in keys}


def seeds_table_markdown(runs: Mapping[int, Sequence[BenchmarkEntry]], reference: PaperNumbers | None = None) -> str:
    """The Table 1/2 layout with "(mean ± std, ...)" cells; with a reference, its values and mean - reference."""
    table = []
    for task, keys in BLOCKS:
        shown = [
            (name, n, values)
            for name, n, values in _per_seed(runs)
            if any(not math.isnan(mean_std(values[k])[0]) for k in keys)
        ]
        for position, (name, n_classes, values) in enumerate(shown):
            means = {key: mean_std(values[key])[0] for key in keys}
            theirs = paper_values(reference, name, keys=keys) if reference else None
            cells = "(" + ", ".join(spread_cell(values[key]) for key in keys) + ")"
            table.append(
                [
                    task if position == 0 else "",
                    name,
                    str(n_classes),
                    cells,
                    *comparison_cells(reference, means, theirs=theirs, keys=keys),
                ]
            )
        if shown:
            averages = _block_averages(runs, keys)
            means = {key: mean_std(averages[key])[0] for key in keys}
            theirs = reference.block_average([name for name, _, _ in shown], keys) if reference else None
            cells = "(" + ", ".join(spread_cell(averages[key]) for key in keys) + ")"
            table.append(["", "AVERAGE", "-", cells, *comparison_cells(reference, means, theirs=theirs, keys=keys)])
    header = ("Task", "Datasets", "C", "ViP²-CLIP") + (
        (reference.name, f"mean - {reference.name}") if reference else ()
    )
    note = STD_NOTE.format(", ".join(str(seed) for seed in runs))
    return f"{markdown_table(header, table)}\n\n{note}; per seed: seed-N/benchmark.md.\n"


def seeds_json(runs: Mapping[int, Sequence[BenchmarkEntry]]) -> dict[str, Any]:
    datasets = []
    for name, n_classes, values in _per_seed(runs):
        cells = {key: dict(zip(("mean", "std"), mean_std(values[key]), strict=True)) for key in METRIC_KEYS}
        per_seed = {str(seed): {key: values[key][i] for key in METRIC_KEYS} for i, seed in enumerate(runs)}
        datasets.append({"name": name, "n_classes": n_classes, "metrics": cells, "per_seed": per_seed})
    return {
        "seeds": list(runs),
        "std": "sample standard deviation (n - 1)",
        "metrics_scale": "fraction",
        "datasets": datasets,
    }


def write_seed_benchmark(
    out_dir: str | Path, runs: Mapping[int, Sequence[BenchmarkEntry]], *, reference: PaperNumbers | None = None
) -> dict[str, Path]:
    """OUT/benchmark.{md,csv,json} over the seeds' runs (see the module docstring)."""
    out_dir = Path(out_dir)
    data = seeds_json(runs)
    rows = [
        [
            d["name"],
            key,
            csv_number(d["metrics"][key]["mean"]),
            csv_number(d["metrics"][key]["std"]),
            *(csv_number(d["per_seed"][str(seed)][key]) for seed in runs),
        ]
        for d in data["datasets"]
        for key in METRIC_KEYS
    ]
    header = ("dataset", "metric", "mean", "std", *(f"seed_{seed}" for seed in runs))
    return {
        "markdown": atomic_write_text(out_dir / "benchmark.md", seeds_table_markdown(runs, reference)),
        "csv": atomic_write_text(out_dir / "benchmark.csv", csv_text(header, rows)),
        "json": atomic_write_json(out_dir / "benchmark.json", data),
    }
