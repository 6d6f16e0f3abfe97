"""CLIP weights for the frozen backbone: open_clip architectures, OpenAI-format files, pretrained tags, random init.

Nothing is downloaded unless an open_clip pretrained tag is asked for explicitly; a missing file or an unknown
name raises `WeightsError` listing what would work. The tiny CLIP of the tests and the offline demo is built by
open_clip's own `CLIP` class, so every code path runs on it as on ViT-L/14.
"""

from __future__ import annotations

import contextlib
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP

from vip2clip.config import TINY_BACKBONE, TINY_PATCH_SIZE
from vip2clip.model.pretrained import CLIP as CLIP_WEIGHTS
from vip2clip.model.pretrained import resolve_weights
from vip2clip.model.state_check import state_mismatch
from vip2clip.utils.fileio import read_torch_file

# A tiny CLIP built by open_clip's own classes: for tests and the offline demo (random weights, seeded).
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 32, "patch_size": TINY_PATCH_SIZE},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Random backbones are seeded so that separate processes (train, test, predict) build the same network.
RANDOM_INIT_SEED = 0
# Non-tensor entries of OpenAI's TorchScript archives.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


class WeightsError(ValueError):
    """The backbone weights could not be found or do not fit the architecture."""


def available_backbones() -> list[str]:
    """Backbone names accepted by `load_clip`: open_clip ViT architectures plus the tiny test model."""
    names = [name for name in open_clip.list_models() if _is_openai_style_vit(open_clip.get_model_config(name))]
    return [TINY_BACKBONE, *sorted(names)]


def _is_openai_style_vit(config: dict | None) -> bool:
    if not config:
        return False
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    return (
        isinstance(vision.get("layers", 12), int)
        and not vision.get("timm_model_name")
        and not text.get("hf_model_name")
        and not vision.get("attentional_pool", False)
        and vision.get("pool_type", "tok") == "tok"
    )


def load_clip(backbone: str, weights: str | Path | None, *, quick_gelu: bool = True) -> tuple[CLIP, str]:
    """Build an open_clip CLIP and load its weights.

    weights: None (random init, seeded), a local file (OpenAI state dict, OpenAI TorchScript archive,
    or an open_clip checkpoint), a downloaded published tag ("openai-vit-l-14-336", `vip2clip.model.pretrained`),
    or an open_clip pretrained tag such as "openai" (downloads when online).
    Returns the model (eval mode, frozen) and a one-line description of where the weights came from.
    """
    config = _architecture(backbone)
    weights = resolve_weights(weights, CLIP_WEIGHTS)
    if weights is not None and not Path(weights).is_file() and _looks_like_path(str(weights)):
        raise WeightsError(
            f"CLIP weights file not found: {weights}. Pass an existing OpenAI-format file (state dict or "
            f"TorchScript .pt), an open_clip pretrained tag ({_tags_text(backbone)}), or random init."
        )
    if weights is not None and not Path(weights).is_file():
        return _load_tagged(backbone, str(weights))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = CLIP(**config, quick_gelu=quick_gelu)
    source = f"random init (seed {RANDOM_INIT_SEED})"
    if weights is not None:
        _load_state_dict_file(model, Path(weights))
        source = f"file {weights}"
    return _frozen(model), source


def patch_size(backbone: str) -> int:
    """The vision tower's patch side in pixels (14 for ViT-L/14), read from the architecture without building it."""
    return int(_architecture(backbone)["vision_cfg"]["patch_size"])


def _architecture(backbone: str) -> dict:
    if backbone == TINY_BACKBONE:
        return {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_CLIP_CONFIG.items()}
    config = open_clip.get_model_config(backbone)
    if config is None:
        vits = ", ".join(available_backbones()[:12])
        raise ValueError(f"unknown backbone {backbone!r}; open_clip ViT names include: {vits}, ...")
    if not _is_openai_style_vit(config):
        raise ValueError(
            f"backbone {backbone!r} is not a plain ViT CLIP (ViP²-CLIP needs ViT patch tokens and an OpenAI-style "
            "text tower); try ViT-L-14-336, ViT-B-16 or 'tiny'"
        )
    return {key: config[key] for key in ("embed_dim", "vision_cfg", "text_cfg")}


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


def _tags_text(backbone: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    return ", ".join(tags) if tags else "none known for this backbone"


def _load_tagged(backbone: str, tag: str) -> tuple[CLIP, str]:
    if backbone == TINY_BACKBONE or not open_clip.list_pretrained_tags_by_model(backbone):
        raise WeightsError(f"no pretrained tags exist for backbone {backbone!r}; pass a weights file or random init")
    if tag not in open_clip.list_pretrained_tags_by_model(backbone):
        raise WeightsError(
            f"{tag!r} is neither an existing file nor a pretrained tag of {backbone}; tags: {_tags_text(backbone)}"
        )
    quick_gelu = bool(open_clip.get_pretrained_cfg(backbone, tag).get("quick_gelu", False))
    try:
        with _quiet_logging():
            model = open_clip.create_model(
                backbone, pretrained=tag, force_quick_gelu=quick_gelu, require_pretrained=True
            )
    except Exception as error:  # network, hub or cache failures all end here
        raise WeightsError(
            f"could not load pretrained weights {backbone}:{tag} ({type(error).__name__}: {error}). Offline? "
            "Download OpenAI's ViT-L-14-336px.pt elsewhere and pass its path as --clip-weights / clip_weights."
        ) from error
    return _frozen(model), f"open_clip pretrained {backbone}:{tag}"


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """No log lines while open_clip fetches a pretrained tag: offline, huggingface_hub logs each of its retries (44
    lines in a minute) and open_clip its failure, and the one error raised after them says it all."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from a plain torch file or OpenAI's TorchScript archive."""
    if zipfile.is_zipfile(path) and _is_torchscript_archive(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = read_torch_file(path, "CLIP weights", error_type=WeightsError)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds no state dict (found {type(state).__name__})")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    for key in _OPENAI_METADATA_KEYS:
        state.pop(key, None)
    return state


def _is_torchscript_archive(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _load_state_dict_file(model: CLIP, path: Path) -> None:
    state = read_state_dict(path)
    expected = model.state_dict()
    # TorchScript archives also save buffers that open_clip keeps out of its state dict (the causal mask).
    for name, _ in model.named_buffers():
        if name not in expected:
            state.pop(name, None)
    problem = state_mismatch(expected, state)
    if problem:
        raise WeightsError(f"CLIP weights in {path} do not fit this architecture: {problem}")
    model.load_state_dict({key: value.float() for key, value in state.items()})


def _frozen(model: CLIP) -> CLIP:
    model = model.float().eval()
    model.requires_grad_(False)
    return model
