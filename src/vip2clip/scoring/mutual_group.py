"""Mutual scoring of a group of images through a `Predictor` (the rule: `vip2clip.scoring.mutual`).

Two passes over the group. Pass 1 runs the predictor's engine (the model, or the model fused with its reference
images) over every model input (each image, or each of its tiles) through `Predictor.score`, the one batching
path, and keeps per model input its zero-shot score and map (float16, on the CPU) and its patch tokens (float16,
on the model's device). Then the mutual distances of the whole group, per model input its mutual map and score,
fused with the zero-shot ones. Pass 2 decodes each image again and yields its scored `ImageItem` (tiles stitched like
any tiled prediction): memory holds the group's tokens and model-size maps, never its decoded images.

With tiling, an image's patches are those of all its tiles: a tile is compared with every tile of the other
images (a part may sit anywhere in them; images of different sizes compare too).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from vip2clip.data.images import BadImageError, to_rgb
from vip2clip.outputs import ImageBatch, ImageItem
from vip2clip.scoring.mutual import (
    MIN_IMAGES,
    MutualRule,
    alike_share,
    choose_others,
    fuse,
    mutual_distances,
    mutual_maps,
    tokens_digest,
)
from vip2clip.scoring.references import check_engine
from vip2clip.scoring.tiling import StitchedMap, TileConfig, tile_boxes
from vip2clip.utils.progress import Progress, silent

T = TypeVar("T")


class Predictor(Protocol):
    """What mutual scoring needs of a `vip2clip.Predictor` (named here, so that this module, which the predictor
    runs, does not import it back): its engine and model, its tiling and rule, and its one batching path."""

    engine: Any
    model: Any
    tiling: TileConfig | None
    mutual: MutualRule | None

    def score(self, inputs: Any, load: Callable[[Any], Image.Image]) -> Iterator[ImageItem]: ...


@dataclass(frozen=True, kw_only=True)
class GroupReport:
    """What a group's results record: its name, how many images scored each other, how many others each met,
    the rule, and the share of the group that looks alike (`mutual.alike_share`: low when most images differ,
    e.g. a mostly defective batch or mixed parts, where mutual scores are not to be trusted)."""

    name: str
    n_images: int
    others_per_image: int
    alike_share: float
    rule: MutualRule

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "images": self.n_images,
            "others_per_image": self.others_per_image,
            "alike_share": self.alike_share,
        }


class _Recorder:
    """Wraps an engine for pass 1: keeps each model input's score, map and tokens, in order."""

    def __init__(self, engine: Any) -> None:
        try:
            check_engine(engine)
        except ValueError:
            raise ValueError(
                f"mutual scoring needs the encoder's patch tokens, which this inference engine "
                f"({type(engine).__name__}) does not give (an exported graph outputs scores and maps only); use the "
                "PyTorch model for --mutual"
            ) from None
        self.engine, self.config = engine, engine.config
        self.scores: list[float] = []
        self.maps: list[np.ndarray] = []
        self.tokens: list[torch.Tensor] = []  # [L, HW, D] float16 per model input
        self.grid: tuple[int, int] = (0, 0)

    def predict(self, images: np.ndarray | torch.Tensor, **options: Any) -> ImageBatch:
        prediction = self.engine.predict(images, return_features=True, **options)  # options: the references' exclude
        scores, maps = prediction.numpy()
        stacked = torch.stack([t.to(torch.float16) for t in prediction.features.patch_tokens], dim=1)  # [B, L, HW, D]
        self.scores += scores.tolist()
        self.maps += list(maps.astype(np.float16))
        self.tokens += list(stacked)
        self.grid = prediction.features.grid
        return prediction


@dataclass(kw_only=True)
class MutualGroup(Generic[T]):
    """A scored group: its report and, per input, its error (unreadable in pass 1) or its model inputs' zero-shot
    scores and maps and its patch distances [T_i * HW]. `scored()` is pass 2: it fuses and stitches."""

    report: GroupReport
    sources: list[T]
    errors: list[str | None]
    self_references: list[bool]  # per input: it is one of the predictor's reference images
    zero_shot: list[list[tuple[float, np.ndarray]]]
    distances: list[torch.Tensor | None]
    predictor: Predictor
    load: Callable[[T], Image.Image] = to_rgb
    grid: tuple[int, int] = (0, 0)
    mutual_scores: list[float] = field(default_factory=list)  # per readable image: its mutual score

    def mutual(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input `index`'s mutual scores [T] and maps [T, S, S], one per model input (`mutual.mutual_maps`)."""
        config, rule = self.predictor.model.config, self.report.rule
        sigma = config.sigma if rule.sigma is None else rule.sigma
        patches = self.distances[index].view(len(self.zero_shot[index]), -1)
        return mutual_maps(patches, grid=self.grid, size=(config.image_size,) * 2, sigma=sigma)

    def fused(self, index: int) -> list[tuple[float, np.ndarray]]:
        """Input `index`'s fused (score, map [S, S] float32) per model input."""
        weight = self.report.rule.weight
        scores, maps = self.mutual(index)
        return [
            (
                float(fuse(score, float(scores[k]), weight=weight)),
                fuse(zero_map.astype(np.float32), maps[k].float().cpu().numpy(), weight=weight),
            )
            for k, (score, zero_map) in enumerate(self.zero_shot[index])
        ]

    def scored(self) -> Iterator[ImageItem]:
        """One scored ImageItem per input, in order, with the fused score and map (stitched when tiled)."""
        for index, (source, error) in enumerate(zip(self.sources, self.errors, strict=True)):
            if error is not None:
                yield ImageItem(source=source, error=error)
                continue
            try:
                image = self.load(source)
            except BadImageError as problem:  # unreadable since pass 1
                yield ImageItem(source=source, error=problem.problem)
                continue
            tiling, units = self.predictor.tiling, self.fused(index)
            mine = {
                "source": source,
                "image": image,
                "self_reference": self.self_references[index],
            }
            if tiling is None:
                score, fused_map = units[0]
                yield ImageItem(pred_score=score, anomaly_map=fused_map, **mine)
                continue
            stitched = StitchedMap(image.size, tiling)
            if len(stitched.boxes) != len(units):
                yield ImageItem(source=source, error="the image changed while it was scored")
                continue
            for tile, (score, tile_map) in enumerate(units):
                stitched.add(tile, tile_map, score=score)
            score, stitched_map = stitched.finish()
            yield ImageItem(pred_score=score, anomaly_map=stitched_map, **mine)


def score_group(
    predictor: Predictor,
    inputs: Sequence[T],
    *,
    load: Callable[[T], Image.Image] = to_rgb,
    name: str = "",
    progress: Progress = silent,
) -> MutualGroup[T]:
    """Pass 1 and the mutual distances of `inputs` as one group, under `predictor.mutual` (see the module
    docstring). ValueError when fewer than 3 of them can be read (naming the group)."""
    rule = predictor.mutual or MutualRule()
    recorder = _Recorder(predictor.engine)
    first = copy.copy(predictor)  # the same batching, tiling and references' leave-one-out, recorded
    first.engine, first.mutual = recorder, None
    sources, errors, counts, self_references = [], [], [], []
    for scored in progress(first.score(inputs, load), total=len(inputs), desc=f"encode {name}".strip()):
        sources.append(scored.source)
        errors.append(scored.error)
        self_references.append(scored.self_reference)
        tiles = 1 if first.tiling is None else len(tile_boxes(scored.image.size, first.tiling)) if scored.image else 0
        counts.append(0 if scored.error is not None else tiles)
    readable = [i for i, error in enumerate(errors) if error is None]
    if len(readable) < MIN_IMAGES:
        raise ValueError(
            f"mutual scoring of {name or 'the images'}: {len(readable)} readable image(s) of {len(sources)}, at least "
            f"{MIN_IMAGES} are needed (with two, a difference between them could be in either); score more readable "
            "images of the part together"
        )
    bounds = np.cumsum([0, *counts])
    units = [list(range(bounds[i], bounds[i + 1])) for i in range(len(sources))]
    # [L, T_i * HW, D] per image: an untiled image's tokens as recorded (no copy), a tiled one's tiles side by side
    tokens = [
        torch.cat([recorder.tokens[u] for u in units[i]], dim=1) if len(units[i]) > 1 else recorder.tokens[units[i][0]]
        for i in readable
    ]
    recorder.tokens.clear()
    others = choose_others([tokens_digest(t) for t in tokens], max_others=rule.max_others, seed=rule.seed)
    found = mutual_distances(tokens, others, share=rule.share, progress=progress)
    distances: list[torch.Tensor | None] = [None] * len(sources)
    for i, distance in zip(readable, found, strict=True):
        distances[i] = distance
    zero_shot = [[(recorder.scores[u], recorder.maps[u]) for u in mine] for mine in units]
    report = GroupReport(name=name, n_images=len(readable), others_per_image=len(others[0]), alike_share=0.0, rule=rule)
    group = MutualGroup(
        report=report,
        sources=sources,
        errors=errors,
        self_references=self_references,
        zero_shot=zero_shot,
        distances=distances,
        predictor=predictor,
        load=load,
        grid=recorder.grid,
    )
    group.mutual_scores = [float(group.mutual(i)[0].max()) for i in readable]
    group.report = replace(group.report, alike_share=alike_share(group.mutual_scores))
    return group


def score_groups(
    predictor: Predictor,
    groups: Sequence[tuple[str, Sequence[T]]],
    *,
    load: Callable[[T], Image.Image],
    reports: list[GroupReport],
    progress: Progress = silent,
) -> Iterator[ImageItem]:
    """Score each group mutually (`score_group`), appending its report to `reports`; the scored items in order."""
    for name, members in groups:
        group = score_group(predictor, members, load=load, name=name, progress=progress)
        reports.append(group.report)
        yield from group.scored()
