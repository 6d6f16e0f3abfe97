"""The one weights policy of `create_model`, and so of the Python API, the command line, the server and the anomalib
model, which all build through it.

1. A model runs on CLIP weights that were asked for: real weights (`clip_weights=` / `--clip-weights`), or random
   ones on purpose (`random_init=True` / `--random-init`: timing and tests, scores mean nothing). Nothing given is
   an error, not a warning: a trained checkpoint on random CLIP weights gives scores that look fine and mean
   nothing. The tiny test backbone is the exception: it has no published weights, only its seeded random ones.
2. A checkpoint runs on the CLIP weights it was trained with: `vip2clip train` records their fingerprint
   (`FrozenCLIP.fingerprint()`) in the checkpoint, and loading it on weights with another fingerprint is refused,
   naming both, unless allowed (`allow_other_weights=True` / `--allow-other-clip-weights`). Checkpoints that
   record none (written before vip2clip recorded it, the authors' release files) load with a warning. A training
   run resumes only on the weights its epochs were trained on (`check_resumed_weights`, no override).

Torch-free: `ModelSpec` validates its fields with `check_weights_choice` before anything is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from vip2clip.config import TINY_BACKBONE

if TYPE_CHECKING:
    from vip2clip.model.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

BOTH_GIVEN = "give either CLIP weights (clip_weights= / --clip-weights) or random_init=True (--random-init), not both"
NO_CLIP_WEIGHTS = (
    "no CLIP weights given for backbone {backbone}: on random CLIP weights every score is meaningless. Pass "
    "--clip-weights PATH (OpenAI's ViT-L-14-336px.pt or a state dict), --clip-weights openai-vit-l-14-336 (after "
    "`vip2clip download openai-vit-l-14-336`, hash-checked) or --clip-weights openai (open_clip download, needs "
    "internet); in Python clip_weights=... (create_model, Predictor.from_checkpoint, the anomalib ViP2CLIP). "
    "Random weights only on purpose (timing, tests): --random-init / random_init=True"
)
OTHER_WEIGHTS = (
    "checkpoint {checkpoint} was trained on CLIP weights with fingerprint {recorded} ({recorded_source}), but the "
    "model has CLIP weights with fingerprint {used} ({used_source}): its scores would be meaningless. Pass the CLIP "
    "weights it was trained with, or --allow-other-clip-weights / allow_other_weights=True to run it on these anyway"
)


def check_weights_choice(clip_weights: str | Path | None, *, random_init: bool, backbone: str | None = None) -> None:
    """ValueError unless the CLIP weights were chosen: given, or random on purpose (not both), or the tiny test
    backbone (its weights are random by definition). backbone None: only the "not both" part (not known yet)."""
    if clip_weights and random_init:
        raise ValueError(BOTH_GIVEN)
    if backbone is None or clip_weights or random_init or backbone == TINY_BACKBONE:
        return
    raise ValueError(NO_CLIP_WEIGHTS.format(backbone=backbone))


def recorded_fingerprint(checkpoint: Checkpoint) -> tuple[str | None, str]:
    """(fingerprint of the CLIP weights the checkpoint was trained on or None, where those weights came from)."""
    backbone = checkpoint.meta.get("backbone")
    if not isinstance(backbone, dict):
        return None, "not recorded"
    return backbone.get("fingerprint"), str(backbone.get("weights", "source not recorded"))


def check_trained_weights(checkpoint: Checkpoint, fingerprint: str, *, source: str, allow_other_weights: bool) -> None:
    """ValueError when `checkpoint` records CLIP weights other than the model's (`fingerprint`, from `source`),
    unless `allow_other_weights` (then a warning); a warning when it records none."""
    recorded, recorded_source = recorded_fingerprint(checkpoint)
    name = checkpoint.path or "(in memory)"
    if recorded is None:
        trained_on = (
            "the authors' release checkpoints were trained on OpenAI's ViT-L/14@336 weights (openai-vit-l-14-336)"
            if str(checkpoint.meta.get("source", "")).startswith("release")
            else "it was written before vip2clip recorded one"
        )
        logger.warning(
            "checkpoint %s records no fingerprint of the CLIP weights it was trained with (%s): nothing checks that "
            "the CLIP weights given (%s) are those",
            name,
            trained_on,
            source,
        )
        return
    if recorded == fingerprint:
        return
    problem = OTHER_WEIGHTS.format(
        checkpoint=name, recorded=recorded, recorded_source=recorded_source, used=fingerprint, used_source=source
    )
    if not allow_other_weights:
        raise ValueError(problem)
    logger.warning("%s (allowed: running it anyway)", problem.partition(": its scores")[0])


def check_resumed_weights(checkpoint: Checkpoint, fingerprint: str, *, source: str) -> None:
    """ValueError when a training run is resumed on CLIP weights (`fingerprint`, from `source`) other than those its
    epochs were trained on: the next epochs would fit the prompts to another CLIP (no override). Checkpoints that
    record no fingerprint (older ones) resume as before."""
    recorded, recorded_source = recorded_fingerprint(checkpoint)
    if recorded is not None and recorded != fingerprint:
        raise ValueError(
            f"cannot resume {checkpoint.path}: its epochs were trained on CLIP weights with fingerprint {recorded} "
            f"({recorded_source}), this model has {fingerprint} ({source}): resume with those weights"
        )
