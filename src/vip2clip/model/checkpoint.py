"""Checkpoints: our format (weights + full config + version, written atomically) and the authors' release format.

Release format: {"prompt_learner": state_dict, "Zero_try": state_dict} with the key names of the release's
ICA and FGP classes (1x1 Conv1d weights [768, 768, 1]). `release_to_state` / `state_to_release` map the
names and shapes both ways; the prompt buffers travel as they are, so a released checkpoint's quirk (its
normal prompt built from the anomalous sentence) is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vip2clip import __version__
from vip2clip.config import ModelConfig
from vip2clip.model.pretrained import CHECKPOINT, resolve_weights
from vip2clip.utils.fileio import atomic_torch_save, read_torch_file

FORMAT = "vip2clip-checkpoint"
FORMAT_VERSION = 1

# (release key, our key, is a Conv1d weight) for one-to-one tensors; Meta-Net heads are added per index.
_PROMPT_KEYS = [
    ("ctx_pos", "prompts.context_normal"),
    ("ctx_neg", "prompts.context_anomalous"),
    ("cls_ctx", "prompts.generic"),
    ("cls_prompter.bias", "prompts.metanet.bias"),
    ("token_prefix_pos", "prompts.prefix_normal"),
    ("token_prefix_neg", "prompts.prefix_anomalous"),
    ("token_middle_pos", "prompts.state_normal"),
    ("token_middle_neg", "prompts.state_anomalous"),
    ("token_suffix_pos", "prompts.suffix_normal"),
    ("token_suffix_neg", "prompts.suffix_anomalous"),
    ("tokenized_prompts_pos", "prompts.tokens_normal"),
    ("tokenized_prompts_neg", "prompts.tokens_anomalous"),
]
_FGP_KEYS = [
    ("q_proj_pre", "fgp.q_proj"),
    ("k_proj_pre_1", "fgp.k_proj"),
    ("v_proj_pre_1", "fgp.v_proj"),
    ("proj_post_t", "fgp.out_proj"),
]
_RELEASE_UNUSED_SCALAR = "prompt_temp_l1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model configuration, the trainable state, what the file records about its training
    (`meta`) and the file it was read from (`path`, None when built in memory)."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(path: str | Path, config: ModelConfig, *, state: dict[str, torch.Tensor], **meta: Any) -> Path:
    """Write our checkpoint format: trainable weights + buffers, the full config and the package version."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vip2clip_version": __version__,
        "config": config.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in state.items()},
        "meta": meta,
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | Path, base_config: ModelConfig | None = None) -> Checkpoint:
    """Read our format or the release format. For release files the config comes from the tensor shapes
    (context length, dynamic tokens, Meta-Net width) on top of `base_config` (the paper's defaults).

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) naming the file and what is
    wrong with it for anything that is not a readable checkpoint (empty, JSON, an image, truncated, a pickle
    of arbitrary objects, a TorchScript archive)."""
    path = Path(resolve_weights(path, CHECKPOINT))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    payload = read_torch_file(path, "checkpoint", error_type=CheckpointError)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        try:
            config = ModelConfig.from_dict(payload["config"])
            return Checkpoint(config, payload["state_dict"], payload.get("meta", {}), path)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: damaged vip2clip checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(payload, dict) and {"prompt_learner", "Zero_try"} <= set(payload):
        config, state = release_to_state(payload, base_config or ModelConfig())
        return Checkpoint(config, state, {"source": f"release checkpoint {path}"}, path)
    keys = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
    raise CheckpointError(
        f"{path} is neither a vip2clip checkpoint nor a release checkpoint (dict with 'prompt_learner' and "
        f"'Zero_try'); found {keys}"
    )


def _metanet_keys(n_heads: int) -> list[tuple[str, str]]:
    pairs = []
    for head in range(n_heads):
        for layer in (0, 2):
            for kind in ("weight", "bias"):
                pairs.append((f"cls_prompter.fc.{head}.{layer}.{kind}", f"prompts.metanet.heads.{head}.{layer}.{kind}"))
    return pairs


def _require(section: dict, key: str, where: str) -> torch.Tensor:
    if key not in section:
        raise CheckpointError(f"release checkpoint lacks {where}[{key!r}]")
    return section[key]


def release_to_state(payload: dict, base_config: ModelConfig) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Release {"prompt_learner", "Zero_try"} -> (config, our state dict)."""
    prompt, fgp = payload["prompt_learner"], payload["Zero_try"]
    context = _require(prompt, "ctx_pos", "prompt_learner")
    generic = _require(prompt, "cls_ctx", "prompt_learner")
    if context.ndim != 2 or generic.ndim != 2 or context.shape[1] != generic.shape[1]:
        raise CheckpointError(
            f"release prompt tensors have unexpected shapes: ctx_pos {tuple(context.shape)}, cls_ctx "
            f"{tuple(generic.shape)} (expected [n_ctx, D] and [n_dynamic, D])"
        )
    n_dynamic = generic.shape[0]
    hidden = _require(prompt, "cls_prompter.fc.0.0.weight", "prompt_learner").shape[0]
    config = base_config.updated(
        n_context=context.shape[0], n_dynamic=n_dynamic, metanet_hidden=hidden, use_vca=True, use_fgp=True
    )
    state = {ours: _require(prompt, theirs, "prompt_learner") for theirs, ours in _PROMPT_KEYS}
    state.update({ours: _require(prompt, theirs, "prompt_learner") for theirs, ours in _metanet_keys(n_dynamic)})
    for theirs, ours in _FGP_KEYS:
        weight = _require(fgp, f"{theirs}.weight", "Zero_try")
        if weight.ndim != 3 or weight.shape[-1] != 1:
            raise CheckpointError(
                f"Zero_try[{theirs}.weight] should be a 1x1 Conv1d weight [D, D, 1], got {tuple(weight.shape)}"
            )
        state[f"{ours}.weight"] = weight[..., 0]
        state[f"{ours}.bias"] = _require(fgp, f"{theirs}.bias", "Zero_try")
    state["fgp.unused_scale"] = _require(fgp, _RELEASE_UNUSED_SCALAR, "Zero_try").reshape(())
    return config, {key: value.clone() for key, value in state.items()}


def state_to_release(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict -> the release format. Only the full model (VCA and FGP on) exists in that format."""
    if not (config.use_vca and config.use_fgp and config.n_dynamic > 0):
        raise CheckpointError("the release format holds only the full model (VCA and FGP on, dynamic tokens > 0)")
    prompt = {theirs: state[ours] for theirs, ours in _PROMPT_KEYS}
    prompt.update({theirs: state[ours] for theirs, ours in _metanet_keys(config.n_dynamic)})
    fgp = {}
    for theirs, ours in _FGP_KEYS:
        fgp[f"{theirs}.weight"] = state[f"{ours}.weight"].unsqueeze(-1)
        fgp[f"{theirs}.bias"] = state[f"{ours}.bias"]
    fgp[_RELEASE_UNUSED_SCALAR] = state["fgp.unused_scale"].reshape(())
    return {"prompt_learner": prompt, "Zero_try": fgp}


def convert_checkpoint(source: str | Path, destination: str | Path, *, to: str) -> Path:
    """Convert between formats: to="release" or to="vip2clip"."""
    checkpoint = load_checkpoint(source)
    if to == "release":
        return atomic_torch_save(state_to_release(checkpoint.config, checkpoint.state), destination)
    if to == "vip2clip":
        return save_checkpoint(destination, checkpoint.config, state=checkpoint.state, **checkpoint.meta)
    raise ValueError(f"unknown checkpoint format {to!r}; use 'release' or 'vip2clip'")
