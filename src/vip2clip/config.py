"""Typed configuration of the model, with the paper's (and the authors' release's) defaults.

Every field is plain data so that a checkpoint can store the resolved config as a dict and
rebuild the exact model from it (`ModelConfig.from_dict(cfg.to_dict())`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Storage types of cached features and evaluation maps (numpy names).
STORAGE_DTYPES = ("float16", "float32")

DEFAULT_BACKBONE = "ViT-L-14-336"
TINY_BACKBONE = "tiny"
TINY_PATCH_SIZE = 16  # its patches (model/weights.py builds it; read here without torch)
# Largest input side accepted: 4x the paper's 518 px per side. ViT-L/14 at 2048 px already has 21,316 patch tokens
# per image (attention matrices of gigabytes); larger parts are better tiled than fed whole.
MAX_IMAGE_SIZE = 2048
TEXT_PROMPTS = ("learned", "handcrafted")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """ViP²-CLIP hyper-parameters (paper Sec. 4 and App. B.1; release defaults where the paper is silent).

    `feature_layers=None` means "the four quarter-depth blocks" of the backbone: 6/12/18/24 for ViT-L/14.
    `metanet_hidden=None` means half the joint embedding width (384 for ViT-L/14).
    """

    backbone: str = DEFAULT_BACKBONE
    image_size: int = 518
    feature_layers: tuple[int, ...] | None = None
    pos_embed_interpolation: str = "bilinear"
    quick_gelu: bool = True
    # ViP-VCA: "[v1..v7] good [z1..z3]" / "[w1..w7] damaged [z1..z3]"
    state_words: tuple[str, str] = ("good", "damaged")
    n_context: int = 7
    n_dynamic: int = 3
    metanet_hidden: int | None = None
    # ViP-FGP
    fgp_heads: int = 8
    # UTPA
    top_k: int = 50
    temperature: float = 0.07
    sigma: float = 8.0
    # Ablation switches (paper Table 4 / Table 5)
    use_vca: bool = True
    use_fgp: bool = True
    use_utpa: bool = True
    # Text encoder: run only the positions up to the end-of-text token (exact under the causal mask).
    truncate_text: bool = True
    # "learned": the ViP-VCA prompts above; "handcrafted": CLIP's own prompts, untrained (`model.handcrafted`)
    text_prompts: str = "learned"

    def __post_init__(self) -> None:
        if self.feature_layers is not None:
            object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        object.__setattr__(self, "state_words", tuple(self.state_words))
        if len(self.state_words) != 2:
            raise ValueError(f"state_words must be a (normal, anomalous) pair, got {self.state_words!r}")
        for name in ("image_size", "n_context", "fgp_heads", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size {self.image_size} is larger than {MAX_IMAGE_SIZE}: the backbone's attention would need "
                f"memory for ({self.image_size}/patch)^2 tokens per image; the paper uses 518"
            )
        if self.n_dynamic < 0:
            raise ValueError(f"n_dynamic must be >= 0, got {self.n_dynamic}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.text_prompts not in TEXT_PROMPTS:
            raise ValueError(f"text_prompts must be one of {list(TEXT_PROMPTS)}, got {self.text_prompts!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state_words"] = list(self.state_words)
        if self.feature_layers is not None:
            data["feature_layers"] = list(self.feature_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def updated(self, **changes: Any) -> ModelConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown model option(s) {unknown}; valid options: {sorted(known)}")
        return replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training hyper-parameters; the defaults are the release's."""

    epochs: int = 10
    batch_size: int = 8
    lr_prompt: float = 1e-3
    lr_fgp: float = 1e-5
    seed: int = 111
    cache: bool = True
    cache_dir: str | None = None  # None: OUT/feature_cache
    cache_dtype: str = "float16"
    skip_bad: bool = False
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_prompt", "lr_fgp"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.cache_dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {list(STORAGE_DTYPES)}, got {self.cache_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
