"""How `evaluate` scores a class besides the plain model: with reference images (few-shot) and with tiling.

Few-shot protocol (`EvalConfig.shots` = K, as the few-shot rows of WinCLIP+, APRIL-GAN and AnomalyCLIP): per class,
K normal images of the dataset's *train* split, drawn without replacement by a generator seeded with (seed, class
name) so that a class gets the same images whatever other classes are evaluated, become the class's reference
memory (`vip2clip.scoring.references`); the class's test images are scored by the fused rule. Every class must
have K normal train images; the check runs for all classes before any work.

Mutual scoring (`EvalConfig.mutual`, `vip2clip.scoring.mutual`): a class's test images are one group that scores
each other (each image meets at most M others), fused with the model's outputs; under torchrun each class is
scored by one rank (classes round-robin), since its images must meet each other.

Tiling (`EvalConfig.tiling`): each test image is read at its own size and scored tile by tile through
`Predictor.score` (the one batching path); the stitched map, at the image's own size, is resized (`resize_map`,
bilinear) to the evaluation's map size, the model's input size, where the masks are as without tiling. Metrics stay
comparable with untiled runs and memory stays that of one class's maps at that size.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.images import BadImageError, load_image
from vip2clip.data.index import DatasetIndex
from vip2clip.data.transforms import resize_map
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.inference.predictor import InferenceEngine, Predictor
from vip2clip.model.identity import ModelIdentity
from vip2clip.scoring.mutual_rule import MIN_IMAGES, MutualRule
from vip2clip.scoring.references import FusionRule, ReferenceEngine, memory_from_files
from vip2clip.scoring.tiling import TileConfig
from vip2clip.utils.distributed import World
from vip2clip.utils.progress import Progress

Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # rows [B], scores [B], maps [B, S, S], masks bool
T = TypeVar("T")


def choose_shots(index: DatasetIndex, classes: list[str], *, shots: int, seed: int) -> dict[str, list[Path]]:
    """Per class, `shots` normal train images (absolute paths, sorted), drawn with a (seed, class) generator.

    ValueError naming the class and the number available when a class has fewer normal train images."""
    by_class: dict[str, list[str]] = {name: [] for name in classes}
    for samples in index.splits.get("train", {}).values():
        for sample in samples:
            if sample.cls_name in by_class and not sample.anomaly:
                by_class[sample.cls_name].append(sample.img_path)
    chosen = {}
    for name, paths in by_class.items():
        if len(paths) < shots:
            have = f"has {len(paths)} normal train image(s)" if paths else "has no normal train images"
            raise ValueError(
                f"{index.root}: class {name!r} {have}; --shots {shots} needs {shots} per class from the train split"
            )
        drawn = draw_shots(paths, shots=shots, seed=seed, class_name=name)
        chosen[name] = sorted(Path(index.resolve(path)).resolve() for path in drawn)
    return chosen


def check_mutual_classes(index: DatasetIndex, *, split: str, classes: Sequence[str] | None) -> None:
    """ValueError naming every class (of `classes`, None: all of the split) with fewer than 3 images in `split`
    (mutual scoring: each class's images score each other), before any work."""
    counts = {name: len(index.samples(split, [name])) for name in classes or index.classes(split)}
    small = [f"class {name} ({count})" for name, count in counts.items() if count < MIN_IMAGES]
    if small:
        raise ValueError(
            f"mutual scoring needs at least {MIN_IMAGES} {split} images per class (each class's images score each "
            f"other; with two, a difference between them could be in either); too few in {index.root}: "
            f"{', '.join(small)}; add {split} images to those classes, or leave them out (`vip2clip test --classes` "
            "names the classes to evaluate)"
        )


def draw_shots(paths: list[T], *, shots: int, seed: int, class_name: str) -> list[T]:
    """`shots` of `paths` drawn without replacement by the (seed, class name) generator of the few-shot protocol
    (the one draw of `choose_shots` and of the anomalib integration)."""
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])
    return [paths[i] for i in rng.choice(len(paths), size=shots, replace=False)]


def evaluated_identity(
    identity: ModelIdentity, *, tiling: TileConfig | None, shots: int, seed: int, mutual: MutualRule | None = None
) -> PredictorIdentity:
    """The model's identity as the evaluation uses it, for results.json and calibration.json: with the tiling, the
    few-shot protocol (the images are listed per class in results.json) and the mutual-scoring rule (the group of
    an image: its class's test images, as many as the class's counts say)."""
    references = None
    if shots:
        references = {"rule": FusionRule().to_dict(), "shots": shots, "seed": seed, "source": "normal train images"}
    return PredictorIdentity(
        identity, None if tiling is None else tiling.to_dict(), references, None if mutual is None else mutual.to_dict()
    )


def class_engine(
    model: InferenceEngine,
    identity: ModelIdentity,
    *,
    files: list[Path] | None,
    tiling: TileConfig | None,
    batch_size: int,
    cache_dir: Path | None,
) -> InferenceEngine:
    """The engine for one class: the model, or the model fused with the memory of `files`."""
    if not files:
        return model
    memory = memory_from_files(model, identity, paths=files, tiling=tiling, batch_size=batch_size, cache_dir=cache_dir)
    return ReferenceEngine(model, memory)


def class_share(world: World, n: int, *, batch_size: int, mutual: bool, position: int) -> range:
    """The rows of a class a rank scores: a share of whole batches; with mutual scoring the whole class on one rank
    (classes round-robin: the images of a class must meet each other), none on the others."""
    if not mutual:
        return world.share(n, unit=batch_size)
    return range(n) if position % world.size == world.rank else range(0)


def tiled_batches(
    engine: InferenceEngine,
    dataset: AnomalyDataset,
    *,
    tiling: TileConfig | None,
    batch_size: int,
    progress: Progress,
    share: range | None = None,
    mutual: MutualRule | None = None,
) -> Iterator[Batch]:
    """Score the class's images (only those in `share` when given: a rank's share) through a `Predictor`: tile by
    tile, and with `mutual` all of them together; yields batches of (stitched) maps resized to the dataset's size.

    An image (or mask) that cannot be read raises BadImageError, or with `dataset.skip_bad` is listed in
    `dataset.skipped` and left out."""
    predictor = Predictor(engine, batch_size=batch_size, tiling=tiling, mutual=mutual)
    size = dataset.image_size
    rows: list[int] = []
    scores: list[float] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []

    def load(i: int):
        return load_image(dataset.paths(dataset.samples[i])[0])

    share = range(len(dataset)) if share is None else share
    if not share:
        return
    scored_images = predictor.score(share, load, group=f"class {dataset.samples[0].cls_name}")
    for scored in progress(scored_images, total=len(share), desc=dataset.samples[0].cls_name if dataset else ""):
        try:
            if scored.error is not None:
                raise BadImageError(dataset.paths(dataset.samples[scored.source])[0], scored.error)
            mask = dataset.mask(scored.source).numpy() > 0.5
        except BadImageError as error:
            if not dataset.skip_bad:
                raise
            dataset.skipped.append((str(error.path), error.problem))
            continue
        rows.append(scored.source)
        scores.append(scored.pred_score)
        maps.append(resize_map(scored.anomaly_map, (size, size)))
        masks.append(mask)
        if len(rows) == batch_size:
            yield np.array(rows), np.array(scores, dtype=np.float32), np.stack(maps), np.stack(masks)
            rows, scores, maps, masks = [], [], [], []
    if rows:
        yield np.array(rows), np.array(scores, dtype=np.float32), np.stack(maps), np.stack(masks)
