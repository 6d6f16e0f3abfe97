"""Running one of the paper's studies (`paper.studies`): train every variant, test it, resumably.

Layout of a study folder OUT:
    study_settings.json               the study and the settings every variant shares (a re-run must match)
    feature_cache/                    one frozen-feature cache for every variant and every dataset
    models/KEY/seed-S/TRAIN/          a trained model (`training.loop` folder: checkpoint.pt, train_log.jsonl)
    runs/VARIANT/seed-S/TRAIN/TEST/   a variant's results on a test set (results.json ...), done.json when finished
    study.md, study.csv, study.json, figure.png/.csv   the tables (`paper.study_report`)
Variants that differ only in test-time options (Top-K with --top-k-at-test) share a model folder (KEY
"shared-..."); the others have their own (KEY = the variant); untrained CLIP (Table 4's `none`) has none.

Every variant's model is built on the same backbone, weights, image size and layers, so they share the feature
cache: training reads it (`training.loop`) and so does testing (`EvalConfig.feature_cache`, `evaluation.cached`);
the image encoder runs once per image of the study, the rest is the small heads. The command line's model factory
also builds the frozen CLIP once for all of them (`factory.SharedBackbones`; per process under torchrun).

Resuming: a unit (variant, seed, direction) whose done.json exists is read back, not rerun; a unit whose model
finished training is only tested; a unit killed during training continues from its last epoch (`resume`). So a
killed study, run again with the same command, continues at the unfinished unit; `variants` runs a subset, and a
later run can add variants or seeds. A folder holding another study or other settings is refused unless
`overwrite` (which deletes the earlier study's models and runs).

No unit ever tests a model on its own training images: the overlap of every direction's training set with its
test sets is counted from the images' SHA-256 (`data.zero_shot`) before any training, and refused.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vip2clip.config import TrainConfig
from vip2clip.data.index import DatasetIndex
from vip2clip.data.registry import dataset_info
from vip2clip.data.sources import merge_sources, source_counts
from vip2clip.data.zero_shot import count_overlap, index_digests
from vip2clip.evaluation.benchmark import evaluate_dataset
from vip2clip.evaluation.results import EvalConfig
from vip2clip.model.identity import ModelIdentity
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.paper.studies import Direction, Study, Variant
from vip2clip.training.loop import train
from vip2clip.training.run_files import FINAL_CHECKPOINT, LAST_CHECKPOINT
from vip2clip.utils.fileio import atomic_write_json
from vip2clip.utils.folder_lock import LOCK_NAME
from vip2clip.utils.hashing import json_digest
from vip2clip.utils.progress import Progress
from vip2clip.utils.run_context import LOCAL_RUN, RunContext

logger = logging.getLogger(__name__)

STUDY_FILE = "study_settings.json"
DONE_FILE = "done.json"
CACHE_DIR = "feature_cache"
MAX_SEED = 2**63 - 1
# (options, seed, checkpoint) -> a model: with a checkpoint its trained weights (options: test-time overrides),
# without one a fresh model seeded with `seed` for training.
ModelFactory = Callable[[Mapping[str, Any], "int | None", "Path | None"], ViP2CLIP]
# results[variant][test dataset] = one dict of mean metrics per seed, in seed order
StudyResults = dict[str, dict[str, list[dict[str, float]]]]


@dataclass(frozen=True, kw_only=True)
class StudyPlan:
    """What to run: the study, the chosen variants and seeds, the datasets by registry name, and the settings
    that every variant shares (recorded in study_settings.json; `settings` also names the model options given by the
    user, e.g. the backbone and weights)."""

    study: Study
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    datasets: Mapping[str, DatasetIndex]
    train_config: TrainConfig
    eval_config: EvalConfig
    settings: Mapping[str, Any]

    def manifest(self) -> dict[str, Any]:
        """study_settings.json: what must match for a re-run to reuse finished variants."""
        train = {k: v for k, v in self.train_config.to_dict().items() if k not in ("seed", "cache_dir", "num_workers")}
        return {
            "study": self.study.name,
            "reproduces": self.study.reproduces,
            "settings": {
                **dict(self.settings),
                "data": {name: str(index.root) for name, index in self.datasets.items()},
                "protocol": [{"train": list(d.train), "tests": list(d.tests)} for d in self.study.protocol],
                "train": train,
                "evaluation": {
                    "split": self.eval_config.split,
                    "map_dtype": self.eval_config.map_dtype,
                    "cache_dtype": self.eval_config.cache_dtype,
                },
            },
        }


def claim_folder(out_dir: Path, manifest: Mapping[str, Any], *, overwrite: bool) -> None:
    """Make OUT this study's folder: refuse one that holds another study, other settings or other files unless
    `overwrite` (then the earlier study's models and runs are deleted), and write study_settings.json."""
    path = out_dir / STUDY_FILE
    if path.is_file():
        earlier, settings = _earlier_manifest(path, overwrite), manifest["settings"]
        if earlier.get("study") != manifest["study"] or earlier.get("settings") != manifest["settings"]:
            if not overwrite:
                what = (
                    f"the study {earlier.get('study')!r}"
                    if earlier.get("study") != manifest["study"]
                    else f"this study with other settings ({_changed(earlier.get('settings', {}), settings)})"
                )
                raise ValueError(f"{out_dir} holds {what}; pass --overwrite to replace it, or choose another --out")
            for folder in ("models", "runs"):
                shutil.rmtree(out_dir / folder, ignore_errors=True)
    elif out_dir.is_dir() and any(p.name != LOCK_NAME for p in out_dir.iterdir()) and not overwrite:
        raise ValueError(
            f"{out_dir} is not empty and holds no study; pass --overwrite to use it, or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


def _earlier_manifest(path: Path, overwrite: bool) -> dict[str, Any]:
    """study_settings.json as written by an earlier run; ValueError naming it when it is damaged (with
    `overwrite`: {} , so the study starts again)."""
    earlier, problem = _json_object(path, "a study's settings")
    if problem and not overwrite:
        raise ValueError(f"{path} {problem}: pass --overwrite to start the study again, or choose another --out")
    return earlier


def _json_object(path: Path, what: str) -> tuple[dict[str, Any], str]:
    """(the JSON object written in `path`, "") or ({}, what is wrong with the file: empty, damaged, or not an object,
    `what` naming what it should hold)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return {}, f"is empty or damaged ({error})"
    return (data, "") if isinstance(data, dict) else ({}, f"holds a {type(data).__name__}, not {what}")


def _changed(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    keys = sorted(key for key in {*before, *now} if before.get(key) != now.get(key))
    return "differs in: " + ", ".join(keys)


def check_zero_shot(study: Study, datasets: Mapping[str, DatasetIndex], *, split: str) -> None:
    """ValueError naming every direction that would test on its own training images (same SHA-256); each
    dataset is hashed once."""
    hashed: dict[tuple[str, str], list[str]] = {}

    def digests(name: str, of_split: str) -> list[str]:
        if (name, of_split) not in hashed:
            hashed[(name, of_split)] = index_digests(datasets[name], of_split)
        return hashed[(name, of_split)]

    problems = []
    for direction in study.protocol:
        trained = {digest for name in direction.train for digest in digests(name, "test")}
        for test in direction.tests:
            note = count_overlap(digests(test, split), trained).note()
            if note:
                problems.append(f"train {direction.name} -> test {test}: {note}")
    if problems:
        raise ValueError("a study must test zero-shot; refusing:\n  " + "\n  ".join(problems))


def _title(name: str) -> str:
    try:
        return dataset_info(name).title
    except ValueError:
        return name


def model_folder(out_dir: Path, variant: Variant, *, seed: int, direction: Direction) -> Path:
    """Where a variant's model is trained: its own folder, or one shared by test-time-only variants."""
    key = variant.key if not variant.test_options else "shared-" + json_digest(dict(variant.options), 12)
    return out_dir / "models" / key / f"seed-{seed}" / direction.name


def _labelled(progress: Progress, label: str) -> Progress:
    """`progress` with every bar's description prefixed by `label` (which variant, seed and step)."""

    def bars(items, *, total=None, desc=""):
        return progress(items, total=total, desc=f"{label} {desc}".strip())

    return bars


@dataclass
class _Direction:
    """A direction's training index and its sources' record (computed once per study run)."""

    index: DatasetIndex
    sources: list[dict[str, Any]]


def _training_set(direction: Direction, datasets: Mapping[str, DatasetIndex]) -> _Direction:
    if len(direction.train) == 1:
        name = direction.train[0]
        return _Direction(datasets[name], [source_counts(_title(name), datasets[name], split="test").to_dict()])
    merged = merge_sources([(_title(name), datasets[name]) for name in direction.train], "test")
    return _Direction(merged.index, merged.describe())


@dataclass(frozen=True, kw_only=True)
class StudyUnit:
    """One variant trained with one seed in one direction, then tested on the direction's datasets."""

    plan: StudyPlan
    variant: Variant
    seed: int
    direction: Direction
    training: _Direction
    out_dir: Path

    @property
    def results_folder(self) -> Path:
        """OUT/runs/KEY/seed-S/TRAIN: the unit's test results and its done.json."""
        return self.out_dir / "runs" / self.variant.key / f"seed-{self.seed}" / self.direction.name

    @property
    def model_folder(self) -> Path:
        """Where the unit's model is trained (`model_folder`)."""
        return model_folder(self.out_dir, self.variant, seed=self.seed, direction=self.direction)


def _trained_model(unit: StudyUnit, *, build: ModelFactory, run: RunContext) -> tuple[ViP2CLIP, Path | None]:
    """The unit's model: read back when trained, else trained (continued from its last epoch when killed);
    untrained CLIP as it is (no checkpoint)."""
    variant = unit.variant
    if not variant.trained:
        return build(variant.options, None, None), None
    folder = unit.model_folder
    checkpoint = folder / FINAL_CHECKPOINT
    if not checkpoint.is_file():
        config = replace(unit.plan.train_config, seed=unit.seed, cache_dir=str(cache_folder(unit.plan, unit.out_dir)))
        resume = (folder / LAST_CHECKPOINT).is_file()
        model = build(variant.options, unit.seed, None)
        train(
            model,
            unit.training.index,
            out_dir=folder,
            config=config,
            split="test",
            resume=resume,
            overwrite=not resume,
            run=run,
            sources=unit.training.sources,
        )
        if not variant.test_options:
            return model, checkpoint
    return build(variant.test_options, None, checkpoint), checkpoint


def cache_folder(plan: StudyPlan, out_dir: Path) -> Path:
    """The study's feature cache: --cache-dir when given (another disk), else OUT/feature_cache."""
    return Path(plan.train_config.cache_dir) if plan.train_config.cache_dir else out_dir / CACHE_DIR


def _unit_record(variant: Variant, direction: Direction) -> dict[str, Any]:
    """What a unit's done.json must match to be read back: the variant, its options and the direction."""
    return {
        "variant": variant.key,
        "options": dict(variant.options),
        "test_options": dict(variant.test_options),
        "train": list(direction.train),
    }


def read_done(path: Path, variant: Variant, *, direction: Direction) -> dict[str, dict[str, float]] | None:
    """A finished unit's means, or None when it is not finished: no done.json, or one that is empty, damaged,
    incomplete or from other options (an older version, an earlier meaning of the key); those are named in a
    warning and the unit is tested again."""
    if not path.is_file():
        return None
    record, problem = _json_object(path, "a unit's record")
    if not problem and any(record.get(key) != value for key, value in _unit_record(variant, direction).items()):
        problem = "records another variant, options or training set"
    datasets = record.get("datasets") if not problem else None
    if not problem and (not isinstance(datasets, dict) or set(datasets) != set(direction.tests)):
        problem = f"does not hold results for every test set ({', '.join(direction.tests)})"
    if problem:
        logger.warning("%s %s: the unit is tested again", path, problem)
        return None
    return datasets


def run_unit(unit: StudyUnit, *, build: ModelFactory, run: RunContext = LOCAL_RUN) -> dict[str, dict[str, float]]:
    """Train (or read back) one variant for one seed and direction, test it; returns {test: mean metrics}."""
    plan, variant, direction, folder = unit.plan, unit.variant, unit.direction, unit.results_folder
    done = folder / DONE_FILE
    finished = read_done(done, variant, direction=direction)
    if finished is not None:
        logger.info("%s: finished earlier, read back", folder)
        return finished
    model, checkpoint = _trained_model(unit, build=build, run=run)
    identity = ModelIdentity.of(model, checkpoint)
    config = replace(plan.eval_config, feature_cache=cache_folder(plan, unit.out_dir))
    means = {}
    for test in direction.tests:
        record = {"sources": unit.training.sources, "zero_shot": {"zero_shot": True, "checked": "before the study"}}
        if not variant.trained:
            record = {"sources": [], "trained": False, "zero_shot": {"zero_shot": True, "checked": "untrained"}}
        result = evaluate_dataset(
            model,
            plan.datasets[test],
            out_dir=folder / test,
            config=config,
            name=_title(test),
            identity=identity,
            run=run,
            training=record,
        )
        means[test] = dict(result.mean)
    if run.world.is_main:
        atomic_write_json(done, {**_unit_record(variant, direction), "seed": unit.seed, "datasets": means})
    run.world.barrier()
    return means


def run_study(
    plan: StudyPlan,
    out_dir: str | Path,
    *,
    build: ModelFactory,
    overwrite: bool = False,
    run: RunContext = LOCAL_RUN,
) -> StudyResults:
    """Run every (variant, seed, direction) unit of `plan` into OUT (module docstring); returns the means. run: the
    progress bars (each labelled with its unit) and, under torchrun, the process group."""
    out_dir, world = Path(out_dir), run.world
    check_zero_shot(plan.study, plan.datasets, split=plan.eval_config.split)
    if world.is_main:
        claim_folder(out_dir, plan.manifest(), overwrite=overwrite)
    world.barrier()
    trainings = {direction.name: _training_set(direction, plan.datasets) for direction in plan.study.protocol}
    results: StudyResults = {variant.key: {} for variant in plan.variants}
    units = [(v, s, d) for v in plan.variants for s in plan.seeds for d in plan.study.protocol]
    for number, (variant, seed, direction) in enumerate(units, start=1):
        label = f"[{number}/{len(units)}] {variant.key} seed {seed} train {direction.name}:"
        logger.info("study %s %s", plan.study.name, label)
        training = trainings[direction.name]
        unit = StudyUnit(plan=plan, variant=variant, seed=seed, direction=direction, training=training, out_dir=out_dir)
        means = run_unit(unit, build=build, run=replace(run, progress=_labelled(run.progress, label)))
        for test, mean in means.items():
            results[variant.key].setdefault(test, []).append(mean)
    return results


def select_seeds(seeds: Sequence[int] | None, default: int) -> tuple[int, ...]:
    """The seeds to run (the training default when none are given); ValueError for a repeated seed or one that
    PyTorch's generators cannot take (checked before any model is built)."""
    chosen = tuple(seeds) if seeds else (default,)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"a seed is listed twice: {list(chosen)}")
    bad = [seed for seed in chosen if not 0 <= seed <= MAX_SEED]
    if bad:
        raise ValueError(f"seed(s) {bad} outside 0..{MAX_SEED} (the range PyTorch's random generators take)")
    return chosen
