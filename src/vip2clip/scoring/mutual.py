"""Batch zero-shot (mutual scoring): the unlabeled images of one part judge each other (pure tensor functions).

Idea (MuSc, ICLR 2024): in a batch of images of one part, most of them normal, every patch of a normal image has
close matches in the other images, while a defect's patches have none (defects differ from image to image).

Rule (measured on the synthetic benchmarks, docs/mutual.md):
- the units of an image: its patch tokens at each tapped layer (with tiling, the tokens of all its tiles together),
  as the encoder gives them (L2-normalised), kept as float16 on the model's device;
- per layer, patch p of image i and another image j of the group: d_ij(p) = 1 - max cosine similarity of p to
  j's patches, clipped to [0, 1] (the distance of `references.nearest_distance`, taken per other image);
- over the others of i: the mean of the smallest `share` of the d_ij(p) (robust: a defect in some other images,
  or an other image with a different pose, does not raise p's distance); averaged over the layers;
- the mutual map is that patch map smoothed like the UTPA map (`utpa.smooth_map`, the model's sigma) and its
  maximum is the mutual score (the rule of reference images); fused with the zero-shot outputs:
  (1 - weight) * zero-shot + weight * mutual, for the map and the score.

An image never meets itself: its own patches are not among its others. Cost: each image meets at most
`max_others` others. When the group is larger, the others come from a seeded random ring (the images ordered by a
digest of their tokens, then permuted by `seed`): each image meets the `max_others // 2` images on either side, so
the pairs are symmetric and every pair's similarity matrix serves both images (half the work). The similarity
search runs in chunks of at most `budget` similarities (64 MiB of float32 by default, `references.SEARCH_BUDGET`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vip2clip.model import utpa
from vip2clip.outputs import ImageBatch
from vip2clip.scoring.mutual_rule import GROUPS, MIN_IMAGES, MutualRule
from vip2clip.scoring.references import SEARCH_BUDGET
from vip2clip.utils.progress import Progress, silent

__all__ = [  # the rule lives apart (`mutual_rule`): the command line reads it without torch
    "GROUPS",
    "MIN_IMAGES",
    "MutualRule",
    "alike_share",
    "choose_others",
    "fuse",
    "mutual_distances",
    "mutual_maps",
    "predict_mutual",
    "smallest_share_mean",
    "tokens_digest",
]


def tokens_digest(tokens: torch.Tensor) -> str:
    """A digest of an image's tokens [L, P, D] (its place in the seeded ring: independent of the batch order); of
    the first layer's first 64 patches, enough to tell images apart without copying all tokens off the device."""
    return hashlib.sha256(tokens[0, :64].detach().to("cpu", torch.float16).numpy().tobytes()).hexdigest()


def choose_others(keys: Sequence[str], *, max_others: int, seed: int) -> list[list[int]]:
    """The others of each of the images named by `keys` (symmetric: j is an other of i iff i is one of j).

    All the other images when there are at most `max_others`; else a seeded random ring of the images ordered by
    key: each image meets the max_others // 2 images on either side. Depends on the keys, not their order."""
    n = len(keys)
    if n - 1 <= max_others:
        return [[j for j in range(n) if j != i] for i in range(n)]
    ordered = sorted(range(n), key=lambda i: (keys[i], i))
    ring = [ordered[k] for k in np.random.default_rng(seed).permutation(n)]
    position = {image: k for k, image in enumerate(ring)}
    half = max_others // 2
    return [
        sorted(ring[(position[i] + step) % n] for offset in range(1, half + 1) for step in (offset, -offset))
        for i in range(n)
    ]


def smallest_share_mean(distances: torch.Tensor, share: float) -> torch.Tensor:
    """[P, K] distances to K others -> [P]: the mean of the ceil(share * K) smallest per row (at least one)."""
    k = max(1, math.ceil(share * distances.shape[1] - 1e-9))
    return distances.topk(k, dim=1, largest=False).values.mean(dim=1)


def _compute_dtype(tokens: torch.Tensor) -> torch.dtype:
    # float16 products on a GPU (tensor cores, float32 accumulation); the CPU has no fast float16 matrix product.
    return torch.float16 if tokens.device.type == "cuda" else torch.float32


def _pair_chunks(partners: list[int], sizes: Sequence[int], rows: int, budget: int) -> list[list[int]]:
    """Split `partners` into runs whose patches together, times `rows` query rows, fit in `budget`."""
    chunks: list[list[int]] = []
    held = 0
    for j in partners:
        if chunks and held + rows * sizes[j] <= budget:
            chunks[-1].append(j)
            held += rows * sizes[j]
        else:
            chunks.append([j])
            held = rows * sizes[j]
    return chunks


def _layer_distances(
    layer: Sequence[torch.Tensor], others: list[list[int]], *, budget: int, progress: Progress
) -> list[torch.Tensor]:
    """One layer: per image i a [P_i, K_i] table of d_ij over its others j (in the order of others[i])."""
    n = len(layer)
    sizes = [int(t.shape[0]) for t in layer]
    slot = [{j: k for k, j in enumerate(mine)} for mine in others]
    tables = [torch.empty(sizes[i], len(others[i]), device=layer[i].device) for i in range(n)]
    dtype = _compute_dtype(layer[0])
    for i in progress(range(n), total=n, desc="mutual"):
        partners = [j for j in others[i] if j > i]
        rows = max(1, min(sizes[i], budget // max(sizes[j] for j in partners))) if partners else sizes[i]
        query = layer[i].to(dtype)
        for chunk in _pair_chunks(partners, sizes, rows, budget):
            memory = torch.cat([layer[j] for j in chunk]).to(dtype)
            column_best = [torch.full((sizes[j],), -1.0, device=query.device) for j in chunk]
            for start in range(0, sizes[i], rows):
                similarity = query[start : start + rows] @ memory.T  # in the compute dtype: no float32 copy
                for k, block in enumerate(similarity.split([sizes[j] for j in chunk], dim=1)):
                    tables[i][start : start + rows, slot[i][chunk[k]]] = 1.0 - block.amax(dim=1).float()
                    column_best[k] = torch.maximum(column_best[k], block.amax(dim=0).float())
            for j, best in zip(chunk, column_best, strict=True):
                tables[j][:, slot[j][i]] = 1.0 - best
    return [table.clamp_(0.0, 1.0) for table in tables]


def mutual_distances(
    tokens: Sequence[torch.Tensor],
    others: list[list[int]],
    *,
    share: float,
    budget: int = SEARCH_BUDGET,
    progress: Progress = silent,
) -> list[torch.Tensor]:
    """tokens: per image [L, P_i, D] (L2-normalised; float16 on the model's device) -> per image [P_i] float32: the
    layer mean of the smallest-`share` mean of its distances to its `others` (see the module docstring).

    At most `budget` similarities (float32) are held at once; besides the tokens, one layer's tables (P_i x K_i
    float32 per image) are held."""
    if any(not mine for mine in others):
        raise ValueError("every image needs at least one other image to be compared with")
    n_layers = int(tokens[0].shape[0])
    totals = [torch.zeros(int(t.shape[1]), device=t.device) for t in tokens]
    for layer in range(n_layers):
        tables = _layer_distances([t[layer] for t in tokens], others, budget=budget, progress=progress)
        for total, table in zip(totals, tables, strict=True):
            total += smallest_share_mean(table, share)
    return [total / n_layers for total in totals]


def mutual_maps(
    distances: torch.Tensor, *, grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch distances [B, HW] (one row per model input: an image or a tile) -> (mutual score [B], mutual map
    [B, H, W]): smoothed like the UTPA map, the score its maximum (the rule of reference images)."""
    mutual_map = utpa.smooth_map(distances, grid=grid, size=size, sigma=sigma)
    return mutual_map.flatten(1).amax(dim=1), mutual_map


def fuse(zero_shot: np.ndarray | torch.Tensor, mutual: np.ndarray | torch.Tensor, *, weight: float):
    """(1 - weight) * zero-shot + weight * mutual (scores or maps)."""
    return (1.0 - weight) * zero_shot + weight * mutual


def alike_share(mutual_scores: Sequence[float], ratio: float = 1.5) -> float:
    """The share of a group's images that look alike: whose mutual score is at most `ratio` x the group's
    lower-quartile mutual score (the most typical images set the scale of "normal")."""
    scores = np.asarray(mutual_scores, dtype=np.float64)
    if scores.size == 0:
        return math.nan
    scale = float(np.quantile(scores, 0.25))
    return float(np.mean(scores <= ratio * scale + 1e-12))


@torch.no_grad()
def predict_mutual(
    engine: Any, images: np.ndarray | torch.Tensor, *, rule: MutualRule | None = None, progress: Progress = silent
) -> ImageBatch:
    """images [B, 3, S, S] (normalised; B >= 3 images of one part) -> ImageBatch(pred_score [B], anomaly_map
    [B, S, S]): the images of the batch score each other under `rule`, fused with `engine`'s zero-shot outputs
    (a `ViP2CLIP`, or anything whose predict takes `return_features`). One forward pass over the whole batch:
    for files, images of any size, tiling or large batches use `Predictor(model, thresholds, mutual=rule)` (with
    thresholds calibrated for fused scores: `Predictor.predict` decides) or its `score`."""
    rule = rule or MutualRule()
    if len(images) < MIN_IMAGES:
        raise ValueError(f"mutual scoring needs at least {MIN_IMAGES} images in the batch, got {len(images)}")
    prediction = engine.predict(images, return_features=True)
    features = prediction.features
    tokens = list(torch.stack([t.to(torch.float16) for t in features.patch_tokens], dim=1))  # B x [L, HW, D]
    others = choose_others([tokens_digest(t) for t in tokens], max_others=rule.max_others, seed=rule.seed)
    distances = torch.stack(mutual_distances(tokens, others, share=rule.share, progress=progress))
    sigma = engine.config.sigma if rule.sigma is None else rule.sigma
    scores, maps = mutual_maps(distances, grid=features.grid, size=tuple(images.shape[-2:]), sigma=sigma)
    return ImageBatch(
        pred_score=fuse(prediction.pred_score, scores.to(prediction.pred_score.device), weight=rule.weight),
        anomaly_map=fuse(prediction.anomaly_map, maps.to(prediction.anomaly_map.device), weight=rule.weight),
    )
