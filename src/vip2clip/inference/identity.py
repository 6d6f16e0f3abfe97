"""What produced a file of scores or thresholds: the model (`ModelIdentity`) and how the predictor used it.

Tiling and reference images are inference settings, not properties of the model, but they change the scores: a
calibration made with tiles does not fit untiled scores, nor one made without references fused ones. So the
record that calibrations, evaluation results and prediction folders keep is the model's identity plus these
settings, written as one flat JSON object (the model's fields, then "tiling" and "references": the layout files
written before this record existed already have, so they load unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vip2clip.model.identity import ModelIdentity


@dataclass(frozen=True)
class PredictorIdentity:
    """model: the model's identity. tiling: `TileConfig.to_dict()` (None: whole images). references: the reference
    images' record (`ReferenceMemory.record()`: fusion rule, files, hash; or the few-shot protocol of an
    evaluation), None without references and in records of older versions. mutual: the mutual-scoring rule
    (`MutualRule.to_dict()`), None when each image was scored alone (and in records of older versions)."""

    model: ModelIdentity
    tiling: dict[str, Any] | None = None
    references: dict[str, Any] | None = None
    mutual: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.model.to_dict(), "tiling": self.tiling, "references": self.references, "mutual": self.mutual}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorIdentity:
        return cls(ModelIdentity.from_dict(data), data.get("tiling"), data.get("references"), data.get("mutual"))

    def with_model(self, model: ModelIdentity) -> PredictorIdentity:
        return replace(self, model=model)

    def mismatches(self, other: PredictorIdentity, labels: tuple[str, str] = ("recorded", "used")) -> list[str]:
        """What differs, in words (`ModelIdentity.mismatches`, then the tiling, the references' fusion rule and the
        mutual-scoring rule; not which reference images: other good parts of the same setup give scores on the same
        scale); [] if the two records describe the same scoring."""
        mine, theirs = labels
        problems = self.model.mismatches(other.model, labels)
        if self.tiling != other.tiling:
            problems.append(f"tiling: {mine} {_option(self.tiling)}, {theirs} {_option(other.tiling)}")
        rules = [None if r is None else r.get("rule") for r in (self.references, other.references)]
        if rules[0] != rules[1]:
            problems.append(f"reference images: {mine} {_option(rules[0])}, {theirs} {_option(rules[1])}")
        if self.mutual != other.mutual:
            problems.append(f"mutual scoring: {mine} {_option(self.mutual)}, {theirs} {_option(other.mutual)}")
        return problems


def _option(value: dict[str, Any] | None) -> str:
    return "none" if value is None else ", ".join(f"{key} {item}" for key, item in value.items())
