"""What a training run keeps in its output folder, and how it resumes: OUT/last.pt after every epoch (weights, Adam
state, RNG state, history), OUT/train_log.jsonl (one line per epoch), OUT/checkpoint.pt at the end; an earlier
run in OUT is continued (`resume`) or replaced (`overwrite`), never mixed with a new one."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from vip2clip import __version__
from vip2clip.config import TrainConfig
from vip2clip.data.index import DatasetIndex
from vip2clip.model.checkpoint import load_checkpoint, save_checkpoint
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.model.weights_policy import check_resumed_weights
from vip2clip.utils.distributed import World
from vip2clip.utils.fileio import atomic_write_text, json_line

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"
# Settings that may differ between a run and its resumption: they change at most the fp16 rounding of the features.
_RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "cache", "cache_dir"})


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def run_meta(
    model: ViP2CLIP, index: DatasetIndex, *, split: str, config: TrainConfig, world: World, sources: list[dict]
) -> dict[str, Any]:
    backbone = model.backbone
    return {
        **world.describe(model),
        "train_config": config.to_dict(),
        "dataset": {"name": index.root.name, "root": str(index.root), "split": split},
        "sources": sources,
        "backbone": {"name": backbone.name, "weights": backbone.weights_source, "fingerprint": backbone.fingerprint()},
        "precision": model.precision,
        "trained_with": f"vip2clip {__version__}",
    }


def resume_run(
    model: ViP2CLIP, optimizer: torch.optim.Optimizer, *, out_dir: Path, config: TrainConfig
) -> tuple[int, list]:
    """Restore weights, Adam state and RNG from OUT/last.pt; returns (epochs done, history)."""
    path = out_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (no epoch of this run finished)")
    checkpoint = load_checkpoint(path)
    if checkpoint.config != model.config:
        raise ValueError(f"cannot resume {path}: it was trained with another model configuration ({checkpoint.config})")
    check_resumed_weights(checkpoint, model.backbone.fingerprint(), source=model.backbone.weights_source)
    before = checkpoint.meta["train_config"]
    changed = sorted(k for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES and before.get(k) != v)
    if changed:
        raise ValueError(f"cannot resume {path} with different training settings: {changed} (were {before})")
    model.load_trainable_state_dict(checkpoint.state)
    optimizer.load_state_dict(checkpoint.meta["optimizer"])
    set_rng_state(checkpoint.meta["rng"])
    logger.info("resuming %s after epoch %d", path, checkpoint.meta["epoch"])
    return int(checkpoint.meta["epoch"]), list(checkpoint.meta["history"])


def earlier_run(out_dir: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """The files of an earlier run in OUT that `overwrite` replaces; refuses to mix runs (module docstring)."""
    if resume and overwrite:
        raise ValueError("give either resume (continue the run in OUT) or overwrite (start afresh), not both")
    earlier = [out_dir / name for name in (LAST_CHECKPOINT, FINAL_CHECKPOINT, TRAIN_LOG) if (out_dir / name).exists()]
    if earlier and not resume and not overwrite:
        state = "a finished training run" if (out_dir / FINAL_CHECKPOINT).exists() else "an unfinished training run"
        raise ValueError(
            f"{out_dir} holds {state} ({', '.join(path.name for path in earlier)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    return [] if resume else earlier


def write_log(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """OUT/train_log.jsonl holding exactly `history` (one strict JSON line per epoch)."""
    atomic_write_text(out_dir / TRAIN_LOG, "".join(json_line(record) + "\n" for record in history))


def save_epoch(
    model: ViP2CLIP, optimizer: torch.optim.Optimizer, *, out_dir: Path, meta: dict[str, Any], history: list
) -> None:
    """OUT/last.pt (weights, Adam state, RNG: what resuming needs) and the epoch's log line."""
    resume_state = {"optimizer": optimizer.state_dict(), "rng": rng_state()}
    epoch = history[-1]["epoch"]
    save_checkpoint(
        out_dir / LAST_CHECKPOINT,
        model.config,
        state=model.trainable_state_dict(),
        **meta,
        epoch=epoch,
        history=history,
        **resume_state,
    )
    with open(out_dir / TRAIN_LOG, "a", encoding="utf-8") as log:
        log.write(json_line(history[-1]) + "\n")
