"""The mutual-scoring rule's parameters (`vip2clip.scoring.mutual` applies it), importable without torch: the
command line reads its defaults on the torch-free ONNX path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIN_IMAGES = 3
GROUPS = ("all", "folder")
# The images given on the command line are the batch a user means: one group unless asked per folder.
DEFAULT_GROUP = "all"


@dataclass(frozen=True, kw_only=True)
class MutualRule:
    """share: the share of the other images whose distances are averaged (the smallest ones); max_others: at most
    this many other images per image (M; a seeded sample beyond, rounded down to even); weight: share of the
    mutual map and score in the fused outputs (1: mutual only); sigma: Gaussian smoothing of the mutual map in
    model-input pixels (None: the model's sigma); seed: the sample's seed."""

    share: float = 0.3
    max_others: int = 64
    weight: float = 0.75
    sigma: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"mutual share must be in (0, 1], got {self.share}")
        if self.max_others < 2:
            raise ValueError(f"mutual max_others (M) must be >= 2, got {self.max_others}")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"mutual weight must be in (0, 1], got {self.weight}")
        if self.sigma is not None and self.sigma < 0:
            raise ValueError(f"mutual sigma must be >= 0, got {self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "max_others": self.max_others,
            "weight": self.weight,
            "sigma": self.sigma,
            "seed": self.seed,
            "distance": "1 - max cosine to each other image's patches, mean of the smallest share, layer mean",
        }
