"""Named model presets: the paper's model, each variant of its ablations and the tiny test backbone, as data
(`presets.json` beside this module), in the manner of open_clip's `list_models` and timm's registry.

`vip2clip.create_model("ablation-utpa")` builds a preset; explicit arguments override it. A preset fixes the
architecture (backbone and ModelConfig switches); the weights are chosen separately (`clip_weights=`,
`checkpoint=`, and the published weights of `vip2clip.model.pretrained`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from vip2clip.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class Preset:
    """One named configuration. image_size None: ModelConfig's default (518). paper: the tables/figures it is."""

    name: str
    backbone: str
    image_size: int | None
    config: dict[str, Any]
    paper: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        known = {field.name for field in fields(ModelConfig)} - {"backbone", "image_size"}
        unknown = sorted(set(self.config) - known)
        if unknown:
            raise ValueError(f"preset {self.name!r} sets unknown model options {unknown}")

    def model_config(self) -> ModelConfig:
        """The full configuration this preset builds (defaults for everything it does not set)."""
        sizes = {} if self.image_size is None else {"image_size": self.image_size}
        return ModelConfig(backbone=self.backbone, **sizes, **self.config)


@functools.cache
def _table() -> dict[str, Preset]:
    data = json.loads(resources.files("vip2clip.model").joinpath("presets.json").read_text(encoding="utf-8"))
    return {
        name: Preset(name=name, **{**entry, "config": dict(entry["config"]), "paper": tuple(entry["paper"])})
        for name, entry in data["presets"].items()
    }


def list_models() -> list[str]:
    """The preset names, the paper's model first.

    Example:
        >>> import vip2clip
        >>> vip2clip.list_models()[:2]
        ['vip2clip', 'ablation-none']
    """
    return list(_table())


def is_preset(name: str | None) -> bool:
    return name is not None and name in _table()


def get_preset(name: str) -> Preset:
    """The preset called `name`. Raises ValueError listing the valid names for any other name."""
    try:
        return _table()[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(list_models())}") from None


def backbone_of(name: str | None) -> str | None:
    """The CLIP backbone a name stands for: a preset's backbone, or the name itself (an open_clip name)."""
    return get_preset(name).backbone if is_preset(name) else name


def is_untrained(name: str | None) -> bool:
    """True for a preset that needs no training and no checkpoint (CLIP's hand-written prompts, clip-zero-shot)."""
    return is_preset(name) and get_preset(name).config.get("text_prompts") == "handcrafted"
