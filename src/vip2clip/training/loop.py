"""Training loop of the release (paper Sec. 4.3): Adam on the prompt learner and FGP, no scheduler, no augmentation.

The frozen image encoder runs once per image, into the feature cache (`vip2clip.features.feature_cache`); every
epoch then reads cached rows, so only the text encoder (VCA prompts depend on the image's global feature) and the
small heads run per batch. With `cache=False` the encoder runs on every batch instead.

Each epoch visits the samples in an order drawn from (seed, epoch) alone, so a run resumed from its last
checkpoint (`resume=True`: weights, Adam state, epoch, RNG state) takes the same steps as an uninterrupted one.
The cache lives in OUT/feature_cache unless `cache_dir` is given (several runs may share one --cache-dir, also
with other settings and at the same time: each setting has its own subfolder, see `features.cache_store`).
After every epoch OUT/last.pt is written atomically and one JSON line is appended to OUT/train_log.jsonl; the
final model (the last epoch: no selection on any test set) is OUT/checkpoint.pt, loadable by
`create_model(checkpoint=...)`. An epoch whose mean loss is NaN or infinite (a diverged run) stops training with an
error instead of saving weights that would judge nothing.

One OUT holds one run. An OUT with a run in it (any of last.pt, checkpoint.pt, train_log.jsonl) is refused unless
`resume` (continue it from last.pt) or `overwrite` (remove those files and start afresh; the feature cache,
which is keyed by its settings, is kept). The log is rewritten from the checkpoint's history when a run starts or
resumes, so it never mixes runs nor repeats or misses an epoch.

Several ranks (`world`, under torchrun) train data-parallel: every rank forms the same global batches as one
process with the same seed and takes a contiguous share of each (sizes differ by at most one; a batch smaller
than the number of ranks leaves some ranks without images for that step). Each rank backpropagates the *sum* of
its images' losses; one all-reduce adds the gradients (and the image counts) over the ranks, and dividing by the
global batch size gives exactly the gradient of the batch's mean loss, whatever the split. Every rank then takes
the same Adam step, so N ranks end with the weights of one process up to float rounding. (Averaging each rank's
mean loss, as DistributedDataParallel does, would weight the images of a short share more.) Only rank 0 writes
checkpoints and the log; every rank can --resume from OUT/last.pt (OUT on a file system all nodes see).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vip2clip.config import TrainConfig
from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.data.index import DatasetIndex
from vip2clip.data.sources import source_counts
from vip2clip.data.zero_shot import RECORD_KEY, training_record
from vip2clip.features.feature_cache import FeatureCache, load_or_build_cache
from vip2clip.model.backbone import ImageFeatures
from vip2clip.model.checkpoint import save_checkpoint
from vip2clip.model.handcrafted import NOTHING_TO_TRAIN
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.training.losses import LossParts, training_loss
from vip2clip.training.run_files import (
    FINAL_CHECKPOINT,
    LAST_CHECKPOINT,
    earlier_run,
    resume_run,
    run_meta,
    save_epoch,
    write_log,
)
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

logger = logging.getLogger(__name__)

CACHE_SUBDIR = "feature_cache"


@dataclass
class TrainResult:
    """checkpoint: OUT/checkpoint.pt; history: one dict per epoch (epoch, losses, seconds, steps)."""

    checkpoint: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache_bytes: int = 0


def build_optimizer(model: ViP2CLIP, config: TrainConfig) -> torch.optim.Adam:
    """Adam with two groups: the prompt learner at lr_prompt, FGP at lr_fgp (the release's 0.01x)."""
    prompt_params = [p for p in model.prompts.parameters() if p.requires_grad]
    fgp_params = [p for p in model.fgp.parameters() if p.requires_grad] if model.fgp is not None else []
    covered = {id(p) for p in prompt_params + fgp_params}
    stray = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise ValueError(f"trainable parameters outside the prompt learner and FGP: {stray}")
    groups = [{"params": prompt_params, "lr": config.lr_prompt, "name": "prompt"}]
    if fgp_params:
        groups.append({"params": fgp_params, "lr": config.lr_fgp, "name": "fgp"})
    return torch.optim.Adam(groups)


def epoch_batches(rows: list[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch (epoch is 1-based), a pure function of (rows, seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(rows), generator=generator).tolist()
    shuffled = [rows[i] for i in order]
    return [shuffled[start : start + batch_size] for start in range(0, len(shuffled), batch_size)]


Batch = tuple[ImageFeatures, torch.Tensor, torch.Tensor]  # features, masks [B, S, S], labels [B]
LOSS_PARTS = ("total", "focal", "dice", "image")


def local_share(batch: list[int], world: World) -> list[int]:
    """This rank's rows of a global batch (all of it in one process)."""
    return [batch[i] for i in world.share(len(batch))]


def _cached_batches(
    cache: FeatureCache, labels: list[int], *, batches: list[list[int]], device, world: World
) -> Iterator[Batch | None]:
    for batch in batches:
        rows = local_share(batch, world)
        if not rows:  # a global batch smaller than the number of ranks
            yield None
            continue
        yield (
            cache.features(rows, device),
            cache.masks(rows).to(device),
            torch.tensor([labels[row] for row in rows], device=device),
        )


def _encoded_batches(
    model: ViP2CLIP, dataset: AnomalyDataset, *, batches: list[list[int]], workers: int, world: World, seen: list[str]
) -> Iterator[Batch | None]:
    """The batches, encoded; the pixel digests of the images decoded are appended to `seen`."""
    device = next(model.parameters()).device
    shares = [local_share(batch, world) for batch in batches]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=shares, collate_fn=collate_items, num_workers=workers)
    for batch in loader:
        if batch is None:  # no image of this share (every one failed to decode with skip_bad, or an empty share)
            yield None
            continue
        seen.extend(batch["pixels"])
        features = model.encode_image(batch["image"].to(device))
        yield features, batch["mask"].to(device), batch["label"].to(device)


def _batch_loss(model: ViP2CLIP, batch: Batch) -> LossParts:
    features, masks, labels = batch
    output = model.forward_features(features)
    maps = output.probability_maps((masks.shape[-2], masks.shape[-1]))  # L x [B, 2, S, S]
    return training_loss(maps, masks, image_logits=output.image_logits, labels=labels)


def train_step(
    model: ViP2CLIP, optimizer: torch.optim.Optimizer, *, batch: Batch | None, world: World = LOCAL
) -> dict[str, float] | None:
    """One optimisation step on a batch (this rank's share of it); returns the loss parts of the whole batch as
    floats, or None when the batch held no image on any rank (no step, as one process skips an empty batch)."""
    if not world.distributed:
        if batch is None:
            return None
        parts = _batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        return parts.as_floats()
    optimizer.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    sums = torch.zeros(1 + len(LOSS_PARTS), device=device)  # images, then each loss part summed over images
    if batch is not None:
        count = batch[2].shape[0]
        parts = _batch_loss(model, batch)
        (parts.total * count).backward()  # the sum of this rank's per-image losses
        sums = torch.tensor([count] + [count * v for v in parts.as_floats().values()], device=device)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    sums = world.sum_gradients(parameters, sums).tolist()
    if sums[0] == 0:
        return None
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad /= sums[0]
    optimizer.step()
    return {name: value / sums[0] for name, value in zip(LOSS_PARTS, sums[1:], strict=True)}


def run_epoch(
    model: ViP2CLIP, optimizer: torch.optim.Optimizer, *, batches: Iterable[Batch | None], world: World = LOCAL
) -> dict[str, float]:
    """One pass over `batches`: mean loss parts, number of steps and seconds taken."""
    started = time.perf_counter()
    sums = dict.fromkeys(LOSS_PARTS, 0.0)
    steps = 0
    for batch in batches:
        losses = train_step(model, optimizer, batch=batch, world=world)
        if losses is None:
            continue
        sums = {key: sums[key] + losses[key] for key in sums}
        steps += 1
    means = {key: value / max(1, steps) for key, value in sums.items()}
    return {**means, "steps": steps, "seconds": round(time.perf_counter() - started, 3)}


def _prepare_batches(
    model: ViP2CLIP,
    dataset: AnomalyDataset,
    *,
    out_dir: Path,
    config: TrainConfig,
    run: RunContext,
    seen: list[str],
) -> tuple[list[int], Callable[[list[list[int]]], Iterator[Batch | None]], FeatureCache | None]:
    """(trainable rows, batches -> iterator of this rank's Batch, the cache or None): from the cache, or encoding
    (then the pixel digests of the images decoded go to `seen`)."""
    world, workers = run.world, config.num_workers
    if not config.cache:
        rows = list(range(len(dataset)))
        return (
            rows,
            lambda b: _encoded_batches(model, dataset, batches=b, workers=workers, world=world, seen=seen),
            None,
        )
    directory = Path(config.cache_dir) if config.cache_dir else out_dir / CACHE_SUBDIR
    cache = load_or_build_cache(
        model,
        dataset,
        directory=directory,
        dtype=config.cache_dtype,
        batch_size=config.batch_size,
        num_workers=workers,
        run=run,
    )
    device = next(model.parameters()).device
    labels = dataset.labels
    return cache.valid_indices, lambda b: _cached_batches(cache, labels, batches=b, device=device, world=world), cache


def train(
    model: ViP2CLIP,
    index: DatasetIndex,
    *,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    split: str = "test",
    resume: bool = False,
    overwrite: bool = False,
    run: RunContext = LOCAL_RUN,
    sources: list[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train `model`'s prompt learner and FGP on a split of `index`; checkpoints and log go to `out_dir`.

    sources: the datasets `index` was merged from, with their image counts (`data.sources.merge_sources`),
    recorded in the checkpoint and every log line (default: `index` itself). The checkpoint also records the
    SHA-256 of every training image (`data.zero_shot`). Raises ValueError when `out_dir` holds a run and neither
    `resume` nor `overwrite` is given. `run`: the progress bars and, under torchrun, the process group (every
    rank calls this with its `run.world`; see the module docstring)."""
    if model.config.text_prompts == "handcrafted":
        raise ValueError(NOTHING_TO_TRAIN)
    config, out_dir, world = config or TrainConfig(), Path(out_dir), run.world
    replaced = earlier_run(out_dir, resume=resume, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = AnomalyDataset(index, split, image_size=model.config.image_size, skip_bad=config.skip_bad)
    if len(dataset) == 0:
        raise ValueError(f"{index.root}: split {split!r} has no usable samples to train on")
    optimizer = build_optimizer(model, config)
    start, history = resume_run(model, optimizer, out_dir=out_dir, config=config) if resume else (0, [])
    if not resume:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
    seen: list[str] = []  # without a cache: the pixel digests of the images an epoch decoded
    rows, make_batches, cache = _prepare_batches(model, dataset, out_dir=out_dir, config=config, run=run, seen=seen)
    sources = sources or [source_counts(index.root.name, index, split=split).to_dict()]
    meta = run_meta(model, index, split=split, config=config, world=world, sources=sources)
    digests = cache.image_digests(dataset, rows, world=world) if cache is not None else None
    if digests is not None:
        meta[RECORD_KEY] = training_record(digests, split)
    described = {**world.describe(model), "sources": [f"{s['name']}: {s['images']} images" for s in sources]}
    if world.is_main:  # every rank has checked OUT by now (the cache's collectives came first)
        for path in replaced:  # only now that the data and the cache are ready: a bad dataset keeps the earlier run
            path.unlink()
            logger.info("replacing the earlier run in %s: removed %s", out_dir, path.name)
        write_log(out_dir, history)
    model.train()
    for epoch in range(start + 1, config.epochs + 1):
        batches = epoch_batches(rows, config.batch_size, seed=config.seed, epoch=epoch)
        steps = run.progress(make_batches(batches), total=len(batches), desc=f"epoch {epoch}/{config.epochs}")
        record = {"epoch": epoch, **run_epoch(model, optimizer, batches=steps, world=world), **described}
        _refuse_divergence(record, out_dir)
        if RECORD_KEY not in meta:  # no cache: every image was decoded in this epoch (each rank its share)
            meta[RECORD_KEY] = training_record([d for part in world.all_gather(seen) for d in part], split)
        seen.clear()
        history.append(record)
        if world.is_main:
            save_epoch(model, optimizer, out_dir=out_dir, meta=meta, history=history)
        losses = f"loss {record['total']:.4f} ({record['steps']} steps, {record['seconds']:.1f} s)"
        logger.info("epoch %d/%d: %s", epoch, config.epochs, losses)
    model.eval()
    return _finish_training(model, out_dir, meta=meta, history=history, dataset=dataset, cache=cache, world=world)


def _refuse_divergence(record: dict[str, Any], out_dir: Path) -> None:
    """Fail closed: an epoch whose mean loss is NaN or infinite stops training (a NaN model would judge nothing,
    or everything); its weights are not saved."""
    if math.isfinite(record["total"]):
        return
    epoch = record["epoch"]
    kept = f"{out_dir / LAST_CHECKPOINT} holds epoch {epoch - 1}" if epoch > 1 else "no checkpoint was written"
    raise ValueError(
        f"training diverged in epoch {epoch} (loss {record['total']}); its weights are not saved ({kept}). "
        "Lower --lr / --lr-fgp and train again (--overwrite)"
    )


def _finish_training(
    model: ViP2CLIP, out_dir: Path, *, meta: dict[str, Any], history: list, dataset: AnomalyDataset, cache, world: World
) -> TrainResult:
    """The final checkpoint (rank 0; every rank waits for it) and the files skipped on any rank."""
    done = history[-1]["epoch"] if history else 0
    final = out_dir / FINAL_CHECKPOINT
    if world.is_main:
        save_checkpoint(final, model.config, state=model.trainable_state_dict(), **meta, epoch=done, history=history)
    reports = world.gather(dataset.skipped)  # without the cache, images fail to decode on the rank that reads them
    world.barrier()  # the final checkpoint exists for every rank (evaluation after training hashes it)
    # Without the cache a file that fails to decode is met (and recorded) once per epoch.
    skipped = [item for report in reports for item in report] if reports else dataset.skipped
    return TrainResult(final, history, list(dict.fromkeys(skipped)), cache.disk_bytes if cache else 0)
