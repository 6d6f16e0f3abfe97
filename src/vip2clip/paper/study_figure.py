"""A figure study's plot (Fig. 5, 6, 10): figure.csv always, figure.png with matplotlib (the `plots` extra).

kind "gain" (Fig. 5): bars per test dataset, the last variant's metric minus each earlier one's (one series per
earlier variant: Fig. 5's two readings of "static prompts"), in points (x100).
kind "sweep" (Fig. 6, 10): one line per series, test dataset and metric against the variants' x values, in percent,
with the seeds' standard deviation as error bars when there are several. The paper prints no numbers for these
figures, so the plot holds ours only, and its title says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vip2clip.evaluation.reports import csv_number, csv_text
from vip2clip.paper.seeds import mean_std
from vip2clip.paper.studies import Study, Variant
from vip2clip.utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)

MISSING_MATPLOTLIB = (
    "figure.png not drawn: matplotlib is not installed (pip install 'vip2clip[plots]'); figure.csv holds the numbers"
)


def figure_points(study: Study, variants: Sequence[Variant], *, results) -> list[dict[str, Any]]:
    """The plotted numbers: one dict per bar or line point (series, dataset, metric, x, mean, std; x100)."""
    figure = study.figure
    chosen = {variant.key for variant in variants}
    points = []
    if figure.kind == "gain":  # the last variant over each earlier one (Fig. 5: over each reading of "static")
        other = study.variants[-1].key
        for base in [variant.key for variant in study.variants[:-1] if {variant.key, other} <= chosen]:
            for test in results[other]:
                for metric in figure.metrics:
                    gains = [
                        b[metric] - a[metric]
                        for a, b in zip(results[base].get(test, []), results[other][test], strict=False)
                    ]
                    mean, std = mean_std(gains)
                    points.append(
                        {
                            "series": f"{other} - {base}",
                            "dataset": test,
                            "metric": metric,
                            "x": test,
                            "mean": 100 * mean,
                            "std": 100 * std,
                        }
                    )
        return points
    series = figure.series or {"": tuple(variant.key for variant in study.variants)}
    for name, keys in series.items():
        for key in [k for k in keys if k in chosen]:
            for test, runs in results[key].items():
                for metric in figure.metrics:
                    mean, std = mean_std([run[metric] for run in runs])
                    points.append(
                        {
                            "series": name,
                            "dataset": test,
                            "metric": metric,
                            "x": figure.x[key],
                            "variant": key,
                            "mean": 100 * mean,
                            "std": 100 * std,
                        }
                    )
    return points


def write_figure(
    out_dir: Path,
    study: Study,
    *,
    variants: Sequence[Variant],
    results,
    titles: Callable[[str], str],
    not_comparable: str | None = None,
) -> dict[str, Path | str]:
    """figure.csv and (with matplotlib) figure.png; "figure_note" says why a PNG is missing. `not_comparable`
    ("not comparable: random CLIP weights", `Comparability.label`) replaces "reproduced" in the title."""
    points = figure_points(study, variants, results=results)
    header = ("series", "dataset", "metric", "variant", "x", "mean", "std")
    rows = [
        [
            p["series"],
            p["dataset"],
            p["metric"],
            p.get("variant", ""),
            p["x"],
            csv_number(p["mean"]),
            csv_number(p["std"]),
        ]
        for p in points
    ]
    written: dict[str, Path | str] = {"figure_csv": atomic_write_text(out_dir / "figure.csv", csv_text(header, rows))}
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError:
        logger.warning("%s", MISSING_MATPLOTLIB)
        written["figure_note"] = MISSING_MATPLOTLIB
        return written
    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=120)
    try:
        if study.figure.kind == "gain":
            _bars(axes, points, study, titles)
        else:
            _lines(axes, points, study, titles)
        what = f"ours, {not_comparable}" if not_comparable else "reproduced (ours; the paper prints no numbers)"
        axes.set_title(f"{study.reproduces} {what}\n{study.title}", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / "figure.png"
        temporary = path.with_name(".figure.png.tmp")
        figure.savefig(temporary, format="png")
        temporary.replace(path)  # whole or not at all
        written["figure"] = path
    finally:
        pyplot.close(figure)
    return written


def _bars(axes, points: Sequence[Mapping[str, Any]], study: Study, titles) -> None:
    tests = list(dict.fromkeys(p["dataset"] for p in points))
    bars = list(dict.fromkeys((p["series"], p["metric"]) for p in points))  # one bar per series and metric
    several = len({series for series, _ in bars}) > 1
    width = 0.8 / max(1, len(bars))
    for offset, (series, metric) in enumerate(bars):
        chosen = {p["dataset"]: p for p in points if (p["series"], p["metric"]) == (series, metric)}
        xs = [i + (offset - (len(bars) - 1) / 2) * width for i in range(len(tests))]
        axes.bar(
            xs,
            [chosen[t]["mean"] if t in chosen else 0.0 for t in tests],
            width,
            yerr=[chosen[t]["std"] if t in chosen else 0.0 for t in tests],
            label=f"{_label(metric)} gain" + (f" ({series})" if several else ""),
        )
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(tests)), [titles(t) for t in tests], rotation=20, fontsize=8)
    axes.set_xlabel(study.figure.x_label)
    axes.set_ylabel(study.figure.y_label)


def _lines(axes, points: Sequence[Mapping[str, Any]], study: Study, titles) -> None:
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["series"], point["dataset"], point["metric"]), []).append(point)
    names = list(dict.fromkeys(point["series"] for point in points))
    for (series, test, metric), line in groups.items():
        line = sorted(line, key=lambda p: p["x"])
        label = ", ".join(part for part in (titles(test), _label(metric), series) if part)
        axes.errorbar(
            [p["x"] for p in line],
            [p["mean"] for p in line],
            yerr=[p["std"] for p in line],
            marker="o",
            capsize=3,
            label=label,
            linestyle=("-", "--", ":", "-.")[names.index(series) % 4],  # one line style per series
        )
    if study.figure.log_x:
        axes.set_xscale("log")
    axes.set_xlabel(study.figure.x_label)
    axes.set_ylabel(study.figure.y_label)


def _label(metric: str) -> str:
    level, name = metric.split("_", 1)
    return f"{level} {name.upper().replace('AUPRO', 'PRO')}"
