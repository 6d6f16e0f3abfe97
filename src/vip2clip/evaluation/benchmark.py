"""The zero-shot protocol runner: evaluate one dataset into a folder, or several into a benchmark table.

`evaluate_dataset` writes OUT/results.{md,csv,json}, OUT/scores.csv (every image's pred_score), OUT/calibration.json
(the F1-optimal thresholds, null where undefined) and, when asked, panels under OUT/maps/. `benchmark_datasets` does
that for each test dataset in OUT/NAME/ and writes the combined Table 1/2-style OUT/benchmark.{md,csv,json}.
Training (when no checkpoint is given) is the caller's business (`vip2clip.training.loop.train`), so that the same
functions serve `vip2clip test`, `vip2clip benchmark` and the demo. Under torchrun every rank calls them with its
`run` (`RunContext`: the progress bars and the process group); rank 0 writes the files.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vip2clip import __version__
from vip2clip.data.index import DatasetIndex
from vip2clip.data.registry import DATASETS, dataset_info, resolve_index
from vip2clip.data.zero_shot import UNKNOWN_NOTE, Overlap
from vip2clip.evaluation.class_scoring import evaluated_identity
from vip2clip.evaluation.evaluate import evaluate
from vip2clip.evaluation.paper_numbers import PaperNumbers
from vip2clip.evaluation.reports import BenchmarkEntry, write_benchmark, write_results, write_scores
from vip2clip.evaluation.results import EvalConfig, EvaluationResult
from vip2clip.inference.calibration import METHOD_F1, make_calibration
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

logger = logging.getLogger(__name__)

CALIBRATION_NAME = "calibration.json"
SCORES_NAME = "scores.csv"
MAPS_DIR = "maps"
AUPRO_PROTOCOL = "cflow: 200 thresholds between the class's min and max map value, FPR < 0.3 rescaled to [0, 1]"
RANDOM_WEIGHTS_NOTE = (
    "the {} backbone has RANDOM weights (no pretrained CLIP): these numbers say nothing about CLIP or ViP²-CLIP."
)
_UNSAFE_FOLDER = re.compile(r"[^A-Za-z0-9._-]+")
TILED_MAPS = "stitched at the image's own size, then resized (bilinear) to map_size, where the masks are"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset on the command line, NAME=ROOT. `title` is the registry's display name, or NAME."""

    name: str
    root: Path
    title: str

    @property
    def registered(self) -> bool:
        return _registry_key(self.name) is not None

    @property
    def folder(self) -> str:
        return _UNSAFE_FOLDER.sub("_", self.name)


def _registry_key(name: str) -> str | None:
    try:
        return dataset_info(name).name
    except ValueError:
        return None


def parse_dataset_spec(text: str) -> DatasetSpec:
    """ "NAME=ROOT" -> DatasetSpec; NAME is a registry name (mvtec, visa, ...) or any label when ROOT has a
    meta.json."""
    name, separator, root = text.partition("=")
    if not separator or not name.strip() or not root.strip():
        raise ValueError(f"expected NAME=ROOT (e.g. visa=/data/visa), got {text!r}")
    key = _registry_key(name.strip())
    title = DATASETS[key].title if key else name.strip()
    return DatasetSpec(name.strip(), Path(root.strip()), title)


def check_test_folders(specs: Sequence[DatasetSpec]) -> None:
    """ValueError when two test datasets would write into one OUT/NAME/ folder (checked before any training)."""
    folders = [spec.folder for spec in specs]
    repeated = next((folder for folder in folders if folders.count(folder) > 1), None)
    if repeated is not None:
        given = ", ".join(f"{spec.name}={spec.root}" for spec in specs if spec.folder == repeated)
        raise ValueError(
            f"two test datasets share the output folder {repeated!r} ({given}): give each test dataset its own "
            "NAME (its results go to OUT/NAME/)"
        )


def load_dataset(spec: DatasetSpec) -> DatasetIndex:
    """The index of a DatasetSpec: ROOT's meta.json, or converted on the fly when NAME is a registry name."""
    if not spec.registered and spec.root.is_dir() and not (spec.root / "meta.json").is_file():
        raise FileNotFoundError(
            f"{spec.root}: no meta.json, and {spec.name!r} is not a dataset name to convert it with "
            f"(known: {', '.join(DATASETS)})"
        )
    return resolve_index(spec.root, spec.name if spec.registered else None)


def recorded_context(
    model: ViP2CLIP, identity: ModelIdentity, *, dataset: Mapping[str, Any], config: EvalConfig, world: World = LOCAL
) -> dict[str, Any]:
    """What a results file records about how it was made: package, model identity (with the tiling and the
    few-shot protocol of `config`), dataset, protocol, and how many processes on which kind of device ran it."""
    identity = evaluated_identity(
        identity, tiling=config.tiling, shots=config.shots, seed=config.seed, mutual=config.mutual
    )
    return {
        "vip2clip_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **world.describe(model),
        "dataset": dict(dataset),
        "model": identity.to_dict(),
        "precision": model.precision,
        "precision_reason": model.precision_reason,  # what "auto" chose and why, or "as asked"
        "protocol": {
            "split": config.split,
            "map_size": model.config.image_size,
            "map_dtype": config.map_dtype,
            "aupro": AUPRO_PROTOCOL,
            "mean": "over the classes where the metric is defined",
            "thresholds": "F1-optimal, 'score >= threshold' is anomalous, all classes pooled",
            "tiling": None if config.tiling is None else {**config.tiling.to_dict(), "maps": TILED_MAPS},
            "references": identity.references,
        },
    }


_UNDEFINED_REASON = {
    "image": "all images have the same label (e.g. all anomalous)",
    "pixel": "no defect pixels or no normal pixels (e.g. no masks)",
}


def write_calibration(path: Path, *, identity: PredictorIdentity, result: EvaluationResult) -> Path | None:
    """calibration.json with the F1-optimal thresholds, null for an undefined one (an image-level-only dataset
    has no pixel threshold, an all-anomalous one no image threshold), with a warning; None (not written) when
    both are undefined."""
    thresholds = {"image": result.image_threshold, "pixel": result.pixel_threshold}
    undefined = [kind for kind, value in thresholds.items() if math.isnan(value)]
    for kind in undefined:
        flag = "--threshold" if kind == "image" else "--pixel-threshold"
        logger.warning(
            "%s: no %s threshold, %s; it is null in the file and `vip2clip predict` needs %s for %s decisions",
            path,
            kind,
            _UNDEFINED_REASON[kind],
            flag,
            kind,
        )
    if len(undefined) == len(thresholds):
        logger.warning("%s not written: neither threshold is defined for this data", path)
        return None
    calibration = make_calibration(
        identity,
        image_threshold=None if "image" in undefined else thresholds["image"],
        pixel_threshold=None if "pixel" in undefined else thresholds["pixel"],
        method=METHOD_F1,
        n_images=result.n_images,
    )
    return calibration.save(path)


def evaluate_dataset(
    model: ViP2CLIP,
    index: DatasetIndex,
    *,
    out_dir: str | Path,
    config: EvalConfig,
    name: str,
    identity: ModelIdentity,
    save_maps: bool = False,
    notes: Sequence[str] = (),
    run: RunContext = LOCAL_RUN,
    paper: PaperNumbers | None = None,
    training: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate and write results.{md,csv,json}, scores.csv, calibration.json and (save_maps) the panels in OUT/maps/.

    identity: `ModelIdentity.of(model, checkpoint)`, recorded in the results and the calibration (with the tiling
    and the few-shot protocol of `config`).
    `notes` go into results.md and results.json; a note on random backbone weights is added automatically.
    paper: numbers to compare with per class and for the mean (`name` is looked up in it).
    training: what the model was trained on and its overlap with these test images (`data.zero_shot`), recorded
    in results.json as "training". run: the progress bars and, under torchrun, the process group (every rank calls
    this; rank 0 writes the files).
    """
    out_dir = Path(out_dir)
    if save_maps:
        config = replace(config, panels_dir=out_dir / MAPS_DIR)
    result = evaluate(model, index, config=config, run=run)
    if not run.world.is_main:
        return result
    dataset = {"name": name, "root": str(index.root), "split": config.split}
    if model.backbone.weights_source.startswith("random"):
        notes = [RANDOM_WEIGHTS_NOTE.format(model.config.backbone), *notes]
    if config.shots:
        notes = [
            *notes,
            f"few-shot: {config.shots} normal train image(s) per class as references (seed "
            f"{config.seed}; listed in results.json), not zero-shot.",
        ]
    if config.tiling is not None:
        notes = [*notes, f"tiled: {config.tiling.size}-px tiles, overlap {config.tiling.overlap}."]
    if config.mutual is not None:
        rule = config.mutual
        notes = [
            *notes,
            f"mutual scoring: each class's test images scored each other (at most {rule.max_others} "
            f"others per image, share {rule.share}, weight {rule.weight}), not zero-shot.",
        ]
    context = recorded_context(model, identity, dataset=dataset, config=config, world=run.world)
    if training is not None:
        context["training"] = dict(training)
    write_results(out_dir, result, context=context, title=name, notes=notes, paper=paper, dataset=name)
    write_scores(out_dir / SCORES_NAME, result)
    evaluated = evaluated_identity(
        identity, tiling=config.tiling, shots=config.shots, seed=config.seed, mutual=config.mutual
    )
    write_calibration(out_dir / CALIBRATION_NAME, identity=evaluated, result=result)
    for path, reason in result.skipped:
        logger.warning("skipped %s: %s", path, reason)
    return result


def benchmark_datasets(
    model: ViP2CLIP,
    tests: Sequence[tuple[DatasetSpec, DatasetIndex]],
    *,
    out_dir: str | Path,
    config: EvalConfig,
    identity: ModelIdentity,
    training: Mapping[str, Any] | None = None,
    save_maps: bool = False,
    run: RunContext = LOCAL_RUN,
    paper: PaperNumbers | None = None,
    overlaps: Mapping[str, Overlap] | None = None,
) -> list[BenchmarkEntry]:
    """Evaluate every test dataset into OUT/NAME/ and write the combined OUT/benchmark.{md,csv,json}.

    identity: `ModelIdentity.of(model, checkpoint)`; training: what the model was trained on (in benchmark.json);
    paper: numbers to compare with (`evaluation.paper_numbers.load_paper_numbers("paper")`), added to the tables;
    overlaps: per test dataset (by folder) its overlap with the training images (`data.zero_shot`), recorded in
    its results and in benchmark.json, with a note when it is not zero-shot. run: the progress bars and the
    process group.
    """
    out_dir = Path(out_dir)
    check_test_folders([spec for spec, _ in tests])
    overlaps = overlaps or {}
    entries, notes = [], []
    for spec, index in tests:
        logger.info("evaluating %s (%s)", spec.title, index.root)
        overlap = overlaps.get(spec.folder)
        note = overlap.note() if overlap else None
        record = {**(training or {}), "zero_shot": overlap.to_dict()} if overlap else training
        result = evaluate_dataset(
            model,
            index,
            out_dir=out_dir / spec.folder,
            config=config,
            name=spec.title,
            identity=identity,
            save_maps=save_maps,
            notes=[note] if note else (),
            run=run,
            paper=paper,
            training=record,
        )
        entries.append(BenchmarkEntry(spec.title, result))
        notes += [f"{spec.title}: {note}"] if note and overlap.known else []
    if any(not overlap.known for overlap in overlaps.values()):
        notes.append(UNKNOWN_NOTE)
    if run.world.is_main:
        tested = {"tests": [{"name": s.title, "root": str(i.root)} for s, i in tests]}
        context = recorded_context(model, identity, dataset=tested, config=config, world=run.world)
        context["training"] = {**(training or {}), "zero_shot": {k: v.to_dict() for k, v in overlaps.items()}}
        write_benchmark(out_dir, entries, context=context, paper=paper, notes=notes)
    return entries
