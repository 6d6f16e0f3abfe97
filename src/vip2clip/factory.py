"""`create_model`: the one place that turns names, files and options into a ready ViP²-CLIP model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vip2clip.config import DEFAULT_BACKBONE, ModelConfig
from vip2clip.model.backbone import FrozenCLIP
from vip2clip.model.checkpoint import Checkpoint, load_checkpoint
from vip2clip.model.presets import get_preset, is_preset
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.model.weights import load_clip
from vip2clip.utils.cpu_features import cpu_features

logger = logging.getLogger(__name__)


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
    clip_weights: str | Path | None = None,
    checkpoint: str | Path | Checkpoint | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    precision: str = "fp32",
    **config: Any,
) -> ViP2CLIP:
    """Build ViP²-CLIP on a frozen open_clip CLIP.

    Returns: the `ViP2CLIP` model. Raises: ValueError (bad preset, option, backbone or size), FileNotFoundError.

    Example:
        >>> import vip2clip
        >>> vip2clip.create_model("tiny", image_size=64, seed=0).config.image_size  # random weights: tests only
        64

    Args:
    backbone: a preset of `vip2clip.list_models()` (its switches are defaults that `config` overrides) or an
        open_clip ViT name (default "ViT-L-14-336", or the checkpoint's).
    clip_weights: None (random: scores mean nothing), a file, a published tag (`vip2clip download`), an open_clip tag.
    checkpoint: ours, the release's, or a downloaded published tag; its config is used, `config` overrides it.
    image_size: input side (default 518, or the checkpoint's). seed: initialises the trainable parts.
    precision: "fp32" (the reference), "bf16"/"fp16" frozen encoders, or "auto" (bf16 where the device computes it
        natively, else fp32; `model.precision_reason` says which and why).
    config: `ModelConfig` fields (switches, top_k, sigma, ...).
    """
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
    clip, source = load_clip(cfg.backbone, clip_weights, quick_gelu=cfg.quick_gelu)
    if clip_weights is None:
        logger.warning("backbone %s has random weights (%s): scores say nothing about CLIP", cfg.backbone, source)
    frozen = FrozenCLIP(clip, cfg.feature_layers, cfg.pos_embed_interpolation, cfg.backbone, source)
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
