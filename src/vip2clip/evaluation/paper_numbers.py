"""The paper's own ViP²-CLIP results, for `--reference paper` (`test`, `benchmark`, studies); not to be confused with
reference *images* (few-shot, `vip2clip.scoring.references`).

The values are facts from the paper (percent with one decimal as printed), kept in one data file shipped with the
package, `paper_results.json`, each with the table it came from:
- Tables 1-2: one row per dataset (`PaperNumbers.row_for`), with the printed AVERAGE rows (`block_average`);
- Tables 10-21: per class of MVTec AD and VisA, all six metrics (`PaperNumbers.class_row`, `class_mean`);
- Tables 4, 5, 6 and 9: the studies (`PaperNumbers.study`): each variant with the model preset that makes it
  (`vip2clip.model.presets`) and its values per dataset;
- Tables 1-2 once more as one-row-per-dataset studies (`PaperNumbers.main_tables`, for `vip2clip study main`);
- Table 3: ViP²-CLIP's efficiency and the device it was measured on (`PaperNumbers.efficiency`, as printed);
- Table 8: ViP²-CLIP's column of the full-shot comparison (read by the tests only; its DAGM cells are cut off).
Datasets are matched through the registry (`vip2clip.data.registry.dataset_info`: a name such as "visa", an alias
or a title such as "VisA"); a dataset or class the paper does not report has no reference ("-" in the tables).

Values here are fractions like our metrics (the paper's percent / 100); a difference is ours - paper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from vip2clip.data.registry import dataset_info
from vip2clip.model.presets import get_preset

# "paper-clip": the paper's CLIP column (Table 2, Tables 10-21), for untrained CLIP (the clip-zero-shot preset)
REFERENCES = {"paper": "paper_results.json", "paper-clip": "clip_results.json"}


@dataclass(frozen=True)
class ReferenceRow:
    """One dataset of the reference: registry name, the table it came from, the name printed there, and its
    values (fractions) for the metrics it reports."""

    dataset: str
    table: str
    printed_name: str
    values: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class ClassRow:
    """One class of a dataset in the per-class tables: our class name, the name printed there, its values
    (fractions) and, per metric, the table each value came from."""

    dataset: str
    class_name: str
    printed_name: str
    values: dict[str, float]
    tables: dict[str, str]


@dataclass(frozen=True)
class ClassComparison:
    """What the reference has for the classes of one evaluated dataset: per class its row (None: not there),
    the reference's mean over those classes, and where that mean comes from."""

    dataset: str
    classes: dict[str, ClassRow | None]
    mean: dict[str, float] | None
    mean_source: str

    @property
    def tables(self) -> list[str]:
        """The tables the numbers come from, in table order."""
        names = {table for row in self.classes.values() if row for table in row.tables.values()}
        if self.mean_source.startswith("Table"):
            names.add(self.mean_source)
        return sorted(names, key=lambda name: int(name.split()[-1]))


@dataclass(frozen=True)
class StudyVariant:
    """One row of a study table: its key (what `vip2clip study --variants` takes), the name printed in the
    paper, the model preset that makes it (`vip2clip.list_models()`), and its values (fractions) per dataset
    registry name."""

    key: str
    printed_name: str
    preset: str
    values: dict[str, dict[str, float]]

    @property
    def model_options(self) -> dict[str, Any]:
        """The ModelConfig options of the variant's preset."""
        return dict(get_preset(self.preset).config)


@dataclass(frozen=True, kw_only=True)
class PaperStudy:
    """A study of the paper (Tables 4, 5, 6, 9): its table, title, notes, variants in the paper's order and,
    where the paper prints them, the AVERAGE rows per block and the training sets per test set ("default": the
    others)."""

    name: str
    table: str
    title: str
    notes: str
    variants: dict[str, StudyVariant]
    averages: dict[str, dict[str, float]]
    training: dict[str, tuple[str, ...]]

    def variant(self, key: str) -> StudyVariant:
        if key not in self.variants:
            raise ValueError(f"{self.table} has no variant {key!r}; its variants: {', '.join(self.variants)}")
        return self.variants[key]

    def values_for(self, key: str, dataset: str) -> dict[str, float] | None:
        """A variant's values on a dataset (name, alias or title; None: not reported there)."""
        return self.variant(key).values.get(_registry_name(dataset))


@dataclass(frozen=True, kw_only=True)
class PaperNumbers:
    """A set of reference results. blocks: block name -> its metric keys; averages: (table, block) -> the
    printed AVERAGE row (fractions)."""

    name: str
    method: str
    source: str
    protocol: str
    blocks: dict[str, tuple[str, ...]]
    rows: dict[str, ReferenceRow]
    averages: dict[tuple[str, str], dict[str, float]]
    classes: dict[str, dict[str, ClassRow]] = field(default_factory=dict)  # dataset -> class -> row
    class_means: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset -> the printed Mean row
    studies: dict[str, PaperStudy] = field(default_factory=dict)
    efficiency: dict[str, Any] = field(default_factory=dict)  # Table 3, as printed (not fractions)
    table_titles: dict[str, str] = field(default_factory=dict)

    def row_for(self, dataset: str) -> ReferenceRow | None:
        """The reference row of a dataset name, alias or registry title (None: not in the reference)."""
        try:
            key = dataset_info(dataset).name
        except ValueError:
            return None
        return self.rows.get(key)

    def block_average(self, datasets: Sequence[str], keys: Sequence[str]) -> dict[str, float] | None:
        """The reference's AVERAGE over `datasets` for one block: the printed average when they are exactly the
        datasets of a table's block, else the mean of their values; None when one of them has no values."""
        rows = [self.row_for(name) for name in datasets]
        if not rows or any(row is None or keys[0] not in row.values for row in rows):
            return None
        block = next(name for name, block_keys in self.blocks.items() if tuple(keys) == block_keys)
        for table in {row.table for row in rows}:
            in_table = {r.dataset for r in self.rows.values() if r.table == table and keys[0] in r.values}
            if in_table == {row.dataset for row in rows} and len(rows) == len(in_table):
                return dict(self.averages[(table, block)])
        return {key: math.fsum(row.values[key] for row in rows) / len(rows) for key in keys}

    def class_row(self, dataset: str, class_name: str) -> ClassRow | None:
        """A class's row in the per-class tables (case, spaces and underscores ignored; None: not there)."""
        return self.classes.get(_registry_name(dataset), {}).get(_class_key(class_name))

    def class_mean(self, dataset: str) -> dict[str, float] | None:
        """The per-class tables' printed Mean row of a dataset (None: no per-class tables for it)."""
        return self.class_means.get(_registry_name(dataset))

    def compare_classes(self, dataset: str, class_names: Sequence[str]) -> ClassComparison | None:
        """The reference for an evaluated dataset's classes (None: nothing for this dataset). The mean is the
        printed one (Tables 1-2) when the classes are exactly the paper's, the mean of the paper's values for
        them when they are a part, and the printed dataset row when the paper has no per-class table."""
        row, per_class = self.row_for(dataset), self.classes.get(_registry_name(dataset))
        if row is None and per_class is None:
            return None
        rows = {name: self.class_row(dataset, name) for name in class_names}
        found = [r for r in rows.values() if r is not None]
        mean, source = (row.values, row.table) if row else (None, "")
        if per_class is not None and {r.class_name for r in found} != {r.class_name for r in per_class.values()}:
            mean, source = None, ""
            if found and len(found) == len(rows):
                mean = {key: math.fsum(r.values[key] for r in found) / len(found) for key in found[0].values}
                source = "mean of the paper's values for these classes"
        return ClassComparison(_registry_name(dataset), rows, mean, source)

    def study(self, name: str) -> PaperStudy:
        if name not in self.studies:
            raise ValueError(f"the {self.name} reference has no study {name!r}; its studies: {', '.join(self.studies)}")
        return self.studies[name]

    def main_tables(self, key: str, preset: str = "vip2clip") -> dict[str, PaperStudy]:
        """Tables 1 and 2 (the training protocol's tables) as studies of one variant `key`: per table its rows
        and printed AVERAGE rows, so that a study's report lays them out as Table 9 (`study main`)."""
        tables: dict[str, PaperStudy] = {}
        for table, title in self.table_titles.items():
            values = {name: dict(row.values) for name, row in self.rows.items() if row.table == table}
            averages = {block: self.averages[(table, block)] for block in self.blocks}
            variant = StudyVariant(key, self.method, preset, values)
            tables[table] = PaperStudy(
                name=key,
                table=table,
                title=title,
                notes="",
                variants={key: variant},
                averages=averages,
                training={},
            )
        return tables

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "source": self.source, "protocol": self.protocol}


def _registry_name(dataset: str) -> str:
    try:
        return dataset_info(dataset).name
    except ValueError:
        return dataset.lower()


def _class_key(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_")


def _fractions(keys: Sequence[str], printed: Sequence[float] | None) -> dict[str, float]:
    if printed is None:
        return {}
    if len(printed) != len(keys):
        raise ValueError(f"expected {len(keys)} values {tuple(keys)}, got {printed}")
    return {key: _fraction(value) for key, value in zip(keys, printed, strict=True)}


def _fraction(printed: float) -> float:
    return round(float(printed) / 100.0, 6)  # 0.954, not 0.9540000000000001


def load_paper_numbers(name: str = "paper") -> PaperNumbers:
    """The named reference (`REFERENCES`), read from the package's data file."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; known: {', '.join(REFERENCES)}")
    data = json.loads(resources.files("vip2clip.evaluation").joinpath(REFERENCES[name]).read_text(encoding="utf-8"))
    blocks = {block: tuple(keys) for block, keys in data["metrics"].items()}
    rows: dict[str, ReferenceRow] = {}
    averages: dict[tuple[str, str], dict[str, float]] = {}
    for table in data["tables"]:
        for entry in table["datasets"]:
            rows[dataset_info(entry["dataset"]).name] = ReferenceRow(
                entry["dataset"], table["table"], entry["printed_name"], _block_values(entry, blocks)
            )
        for block, keys in blocks.items():
            averages[(table["table"], block)] = _fractions(keys, table["average"][block])
    classes, class_means = _per_class(data.get("per_class", []))
    studies = {key: _study(key, study, blocks) for key, study in data.get("studies", {}).items()}
    titles = {table["table"]: table["title"] for table in data["tables"]}
    return PaperNumbers(
        name=name,
        method=data["method"],
        source=data["source"],
        protocol=data["protocol"],
        blocks=blocks,
        rows=rows,
        averages=averages,
        classes=classes,
        class_means=class_means,
        studies=studies,
        efficiency=data.get("efficiency", {}),
        table_titles=titles,
    )


def _block_values(entry: Mapping[str, Sequence[float] | None], blocks: Mapping[str, Sequence[str]]) -> dict:
    values: dict[str, float] = {}
    for block, keys in blocks.items():
        values.update(_fractions(keys, entry.get(block)))
    return values


def _per_class(tables: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, ClassRow]], dict[str, dict]]:
    """Tables 10-21: dataset -> class -> ClassRow, and dataset -> the printed Mean row (fractions)."""
    classes: dict[str, dict[str, ClassRow]] = {}
    means: dict[str, dict[str, float]] = {}
    for entry in tables:
        dataset = dataset_info(entry["dataset"]).name
        metrics = entry["metrics"]
        rows = {}
        for position, item in enumerate(entry["classes"]):
            values = {key: _fraction(metric["values"][position]) for key, metric in metrics.items()}
            tables_of = {key: metric["table"] for key, metric in metrics.items()}
            rows[_class_key(item["class"])] = ClassRow(
                dataset=dataset,
                class_name=item["class"],
                printed_name=item["printed_name"],
                values=values,
                tables=tables_of,
            )
        classes[dataset] = rows
        means[dataset] = {key: _fraction(metric["mean"]) for key, metric in metrics.items()}
    return classes, means


def _study(name: str, data: Mapping[str, Any], blocks: Mapping[str, Sequence[str]]) -> PaperStudy:
    variants = {
        item["key"]: StudyVariant(
            item["key"],
            item["printed_name"],
            item["preset"],
            {_registry_name(dataset): _block_values(entry, blocks) for dataset, entry in item["values"].items()},
        )
        for item in data["variants"]
    }
    averages = {block: _fractions(blocks[block], printed) for block, printed in data.get("average", {}).items()}
    training = {target: tuple(sources) for target, sources in data.get("training", {}).items()}
    return PaperStudy(
        name=name,
        table=data["table"],
        title=data["title"],
        notes=data.get("notes", ""),
        variants=variants,
        averages=averages,
        training=training,
    )


def difference(ours: Mapping[str, float], paper: Mapping[str, float] | None, *, keys: Sequence[str]) -> dict:
    """ours - reference per key (fractions); NaN where either is missing or undefined."""
    paper = paper or {}
    return {key: ours.get(key, math.nan) - paper.get(key, math.nan) for key in keys}
