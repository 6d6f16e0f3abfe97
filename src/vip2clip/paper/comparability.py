"""Whether a run's numbers may be set beside the paper's: the one place every study table, JSON and figure asks.

A run on random CLIP weights, on the tiny test backbone or on another backbone tests the code, not the method: its
tables show no paper column and no "ours - paper" cells, and say why instead ("not comparable: random CLIP
weights"). A test set named like a benchmark whose classes are not that benchmark's (synthetic data passed as
`mvtec=...`) loses the paper's numbers for that set only. `study_report` applies it (`Comparability.paper_of`,
`markdown_lines`, `label`, `to_dict`); other tables built from `PaperStudy` objects call the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from vip2clip.config import DEFAULT_BACKBONE, TINY_BACKBONE
from vip2clip.data.registry import dataset_info
from vip2clip.model.presets import backbone_of

if TYPE_CHECKING:
    from vip2clip.evaluation.paper_numbers import PaperNumbers, PaperStudy


@dataclass(frozen=True)
class Comparability:
    """reasons: why no number of the run may be compared with the paper (empty: they may); datasets: test set ->
    why its numbers may not be (its classes are not the paper's)."""

    reasons: tuple[str, ...] = ()
    datasets: Mapping[str, str] = field(default_factory=dict)

    @property
    def comparable(self) -> bool:
        return not self.reasons

    def label(self) -> str | None:
        """ "not comparable: random CLIP weights; ..." for titles, None when the run is comparable."""
        return f"not comparable: {'; '.join(self.reasons)}" if self.reasons else None

    def paper_of(self, paper: PaperStudy | None) -> PaperStudy | None:
        """The paper's table as this run may show it: None when nothing is comparable, else without the test sets
        that are not."""
        if paper is None or self.reasons:
            return None
        if not self.datasets:
            return paper
        variants = {
            key: replace(variant, values={d: v for d, v in variant.values.items() if d not in self.datasets})
            for key, variant in paper.variants.items()
        }
        return replace(paper, variants=variants)

    def markdown_lines(self, titles: Callable[[str], str]) -> list[str]:
        """The lines under a table that say what is not compared and why."""
        lines = []
        if self.reasons:
            lines.append(
                f"**Not comparable with the paper ({'; '.join(self.reasons)}): no paper column, no differences.** "
                "These numbers check the code, not the method."
            )
        lines += [f"No paper comparison on {titles(name)}: {why}." for name, why in self.datasets.items()]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"comparable": self.comparable, "reasons": list(self.reasons), "datasets": dict(self.datasets)}


def compare_run(
    settings: Mapping[str, Any],
    classes: Mapping[str, Sequence[str]] | None = None,
    *,
    reference: PaperNumbers | None = None,
) -> Comparability:
    """The comparability of a run with the model `settings` (backbone, clip_weights, random_init, as in
    study_settings.json) on test sets with these `classes` (registry name -> class names), against `reference`'s
    per-class tables (a test set the paper lists classes for must hold only those)."""
    reasons = []
    if settings.get("random_init") or not settings.get("clip_weights"):
        reasons.append("random CLIP weights")
    backbone = backbone_of(settings.get("backbone")) or DEFAULT_BACKBONE
    if backbone == TINY_BACKBONE:
        reasons.append("the tiny test backbone")
    elif backbone != DEFAULT_BACKBONE:
        reasons.append(f"backbone {backbone} (the paper's: {DEFAULT_BACKBONE})")
    datasets = {}
    for name, names in (classes or {}).items():
        if reference is None or reference.class_mean(name) is None:
            continue  # the paper lists no classes for this set
        unknown = [cls for cls in names if reference.class_row(name, cls) is None]
        if unknown:
            shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
            datasets[name] = f"its classes ({shown}) are not among the paper's {dataset_info(name).title} classes"
    return Comparability(tuple(reasons), datasets)
