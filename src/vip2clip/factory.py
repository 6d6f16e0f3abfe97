"""`create_model`: the one place that turns names, files and options into a ready ViP²-CLIP model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP

from vip2clip.config import DEFAULT_BACKBONE, ModelConfig
from vip2clip.model.backbone import FrozenCLIP
from vip2clip.model.checkpoint import Checkpoint, load_checkpoint
from vip2clip.model.presets import get_preset, is_preset
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.model.weights import load_clip
from vip2clip.model.weights_policy import check_trained_weights, check_weights_choice
from vip2clip.utils.cpu_features import cpu_features

logger = logging.getLogger(__name__)


class SharedBackbones:
    """Frozen CLIPs built once and handed to every model built with this object (the variants of a study, and a
    unit's training and testing model): one per (backbone, weights, GELU kind, device).

    Sharing is exact: the open_clip CLIP is frozen (requires_grad False, always in eval mode) and holds only its
    weights; what a model may set differently (tapped layers, positional-grid resizes, precision) lives in each
    model's own `FrozenCLIP` wrapper. Each process (torchrun rank) has its own.
    """

    def __init__(self) -> None:
        self._built: dict[tuple[str, str | None, bool, str], tuple[CLIP, str]] = {}

    def clip(
        self, backbone: str, weights: str | Path | None, *, quick_gelu: bool, device: str | torch.device
    ) -> tuple[CLIP, str]:
        """(the CLIP on `device`, where its weights came from), as `load_clip` returns them."""
        key = (backbone, None if weights is None else str(weights), quick_gelu, str(torch.device(device)))
        if key not in self._built:
            clip, source = load_clip(backbone, weights, quick_gelu=quick_gelu)
            self._built[key] = clip.to(device), source
        return self._built[key]

    def __len__(self) -> int:
        return len(self._built)


def _check_patch_multiple(cfg: ModelConfig, patch: int, explicit: bool) -> None:
    """An input side that is not a multiple of the patch size loses its last rows and columns in the patch grid:
    refused when asked for explicitly, a warning for a default (518 suits the /14 backbones, not /16 ones)."""
    if cfg.image_size % patch == 0:
        return
    lower, upper = cfg.image_size // patch * patch, (cfg.image_size // patch + 1) * patch
    problem = (
        f"image size {cfg.image_size} is not a multiple of the {cfg.backbone} backbone's patch size {patch}: the "
        f"last {cfg.image_size % patch} pixel rows and columns are ignored; use "
        + (f"{lower} or {upper}" if lower else f"{upper}")
    )
    if explicit:
        raise ValueError(problem)
    logger.warning("%s (--image-size)", problem)


def create_model(
    backbone: str | None = None,
    *,
    clip_weights: str | Path | None = None,
    checkpoint: str | Path | Checkpoint | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    precision: str = "fp32",
    random_init: bool = False,
    allow_other_weights: bool = False,
    shared: SharedBackbones | None = None,
    **config: Any,
) -> ViP2CLIP:
    """Build ViP²-CLIP on a frozen open_clip CLIP.

    Returns: the `ViP2CLIP` model (`model.preprocess(image)` prepares an image for it). Raises: ValueError (bad
    preset, option, backbone or size; no CLIP weights chosen; a checkpoint trained on other CLIP weights),
    FileNotFoundError.

    Example:
        >>> import vip2clip
        >>> vip2clip.create_model("tiny", image_size=64, seed=0).config.image_size  # random weights: tests only
        64

    Args:
    backbone: a preset of `vip2clip.list_models()` (its switches are defaults that `config` overrides) or an
        open_clip ViT name (default "ViT-L-14-336", or the checkpoint's).
    clip_weights: a file, a published tag (`vip2clip download`) or an open_clip tag; required unless random_init
        (`vip2clip.model.weights_policy`: the tiny test backbone is the one exception, its weights are random).
    checkpoint: ours, the release's, or a downloaded published tag; its config is used, `config` overrides it. It
        must run on the CLIP weights it was trained with (the fingerprint it records) unless allow_other_weights.
    random_init: random CLIP weights on purpose (timing, tests: scores mean nothing).
    image_size: input side (default 518, or the checkpoint's). seed: initialises the trainable parts.
    precision: "fp32" (the reference), "bf16"/"fp16" frozen encoders, or "auto" (bf16 where the device computes it
        natively, else fp32; `model.precision_reason` says which and why).
    shared: take the frozen CLIP from it (built there on first use) instead of building a new one.
    config: `ModelConfig` fields (switches, top_k, sigma, ...).
    """
    cfg, loaded = _resolve_config(backbone, checkpoint, image_size, config)
    check_weights_choice(clip_weights, random_init=random_init, backbone=cfg.backbone)
    if shared is not None:
        clip, source = shared.clip(cfg.backbone, clip_weights, quick_gelu=cfg.quick_gelu, device=device)
    else:
        clip, source = load_clip(cfg.backbone, clip_weights, quick_gelu=cfg.quick_gelu)
    if clip_weights is None:
        logger.warning("backbone %s has random weights (%s): scores say nothing about CLIP", cfg.backbone, source)
    frozen = FrozenCLIP(
        clip,
        feature_layers=cfg.feature_layers,
        pos_embed_interpolation=cfg.pos_embed_interpolation,
        name=cfg.backbone,
        weights_source=source,
    )
    if loaded is not None:
        check_trained_weights(loaded, frozen.fingerprint(), source=source, allow_other_weights=allow_other_weights)
    _check_patch_multiple(cfg, frozen.patch_size, explicit=image_size is not None)
    cfg = cfg.updated(feature_layers=frozen.feature_layers)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = ViP2CLIP(frozen, cfg)
    if loaded is not None:
        model.load_trainable_state_dict(loaded.state)
    model = model.to(device).set_precision(precision)  # "auto" decides for the device the model is on
    _log_precision(model)
    return model


def _resolve_config(
    backbone: str | None, checkpoint: str | Path | Checkpoint | None, image_size: int | None, config: dict[str, Any]
) -> tuple[ModelConfig, Checkpoint | None]:
    """The model's config (preset, then the checkpoint's, then the explicit options) and the loaded checkpoint."""
    if is_preset(backbone):
        preset = get_preset(backbone)
        backbone, config = preset.backbone, {**preset.config, **config}
        if image_size is None and checkpoint is None and preset.image_size is not None:
            config["image_size"] = preset.image_size  # the preset's default size, not an explicit choice
    loaded = None
    base = ModelConfig()
    if checkpoint is not None:
        loaded = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, base_config=base)
        checkpoint, base = loaded.path, loaded.config
        if backbone is not None and loaded.meta.get("source", "").startswith("release"):
            base = base.updated(backbone=backbone)
        elif backbone is not None and backbone != base.backbone:
            raise ValueError(f"checkpoint {checkpoint} was trained on backbone {base.backbone!r}, not {backbone!r}")
    overrides = dict(config)
    if backbone is not None:
        overrides["backbone"] = backbone
    if image_size is not None:
        overrides["image_size"] = image_size
    cfg = base.updated(**overrides) if overrides else base
    if cfg.backbone is None:
        cfg = cfg.updated(backbone=DEFAULT_BACKBONE)
    if loaded is not None and image_size is not None and "source" not in loaded.meta and image_size != base.image_size:
        trained = base.image_size
        message = "checkpoint %s was trained at %d px; running it at %d px changes its scores (thresholds and results"
        logger.warning(message + " from %d px do not carry over)", checkpoint, trained, image_size, trained)
    return cfg, loaded


def _log_precision(model: ViP2CLIP) -> None:
    """Say where a low-precision model computes what (and what auto chose); warn when this CPU emulates bf16
    (slower than fp32)."""
    if model.precision == "fp32":
        if model.precision_reason.startswith("auto"):
            logger.info("precision %s", model.precision_reason)
        return
    features = cpu_features()
    on_cpu = model.backbone.clip.visual.proj.device.type == "cpu"
    if on_cpu and model.precision == "bf16" and features.known and not features.bf16:
        logger.warning("precision bf16: %s (%s); fp32 is faster here", features.describe_bf16(), features.model)
    else:
        logger.info("precision %s: %s", model.precision, model.describe_precision())
