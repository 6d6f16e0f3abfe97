"""Reference numbers for `vip2clip benchmark --reference paper`: the paper's own ViP²-CLIP results.

The values are facts from the paper (Tables 1-2, the ViP²-CLIP column, percent with one decimal as printed),
kept in one data file shipped with the package, `paper_results.json`, together with the table each came from.
Datasets are matched through the registry (`vip2clip.data.registry.dataset_info`: a name such as "visa", an alias
or a title such as "VisA"); a dataset the paper does not report has no reference ("-" in the tables).

Values here are fractions like our metrics (the paper's percent / 100); a difference is ours - paper.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from vip2clip.data.registry import dataset_info

REFERENCES = {"paper": "paper_results.json"}


@dataclass(frozen=True)
class ReferenceRow:
    """One dataset of the reference: registry name, the table it came from, the name printed there, and its
    values (fractions) for the metrics it reports."""

    dataset: str
    table: str
    printed_name: str
    values: dict[str, float]


@dataclass(frozen=True)
class Reference:
    """A set of reference results. blocks: block name -> its metric keys; averages: (table, block) -> the
    printed AVERAGE row (fractions)."""

    name: str
    method: str
    source: str
    protocol: str
    blocks: dict[str, tuple[str, ...]]
    rows: dict[str, ReferenceRow]
    averages: dict[tuple[str, str], dict[str, float]]

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

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "source": self.source, "protocol": self.protocol}


def _fractions(keys: Sequence[str], printed: Sequence[float] | None) -> dict[str, float]:
    if printed is None:
        return {}
    if len(printed) != len(keys):
        raise ValueError(f"expected {len(keys)} values {tuple(keys)}, got {printed}")
    return {key: round(float(value) / 100.0, 6) for key, value in zip(keys, printed, strict=True)}  # 0.954, not ...01


def load_reference(name: str = "paper") -> Reference:
    """The named reference (`REFERENCES`), read from the package's data file."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; known: {', '.join(REFERENCES)}")
    data = json.loads(resources.files("vip2clip.evaluation").joinpath(REFERENCES[name]).read_text(encoding="utf-8"))
    blocks = {block: tuple(keys) for block, keys in data["metrics"].items()}
    rows: dict[str, ReferenceRow] = {}
    averages: dict[tuple[str, str], dict[str, float]] = {}
    for table in data["tables"]:
        for entry in table["datasets"]:
            values = {}
            for block, keys in blocks.items():
                values.update(_fractions(keys, entry[block]))
            rows[dataset_info(entry["dataset"]).name] = ReferenceRow(
                entry["dataset"], table["table"], entry["printed_name"], values
            )
        for block, keys in blocks.items():
            averages[(table["table"], block)] = _fractions(keys, table["average"][block])
    return Reference(name, data["method"], data["source"], data["protocol"], blocks, rows, averages)


def difference(ours: Mapping[str, float], reference: Mapping[str, float] | None, keys: Sequence[str]) -> dict:
    """ours - reference per key (fractions); NaN where either is missing or undefined."""
    reference = reference or {}
    return {key: ours.get(key, math.nan) - reference.get(key, math.nan) for key in keys}
