"""`vip2clip train`: train the prompt learner and FGP on a dataset split (the release trains on the test split)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vip2clip.cli import CLIError
from vip2clip.cli.common import (
    add_config_arguments,
    add_model_arguments,
    add_progress_argument,
    build_model,
    holding_out_folder,
    run_context,
)
from vip2clip.config import TrainConfig
from vip2clip.utils.distributed import World

if TYPE_CHECKING:
    from vip2clip.data.index import DatasetIndex

_DEFAULTS = TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train ViP²-CLIP's prompts and FGP on a dataset (then evaluate zero-shot on other datasets)",
        description="Checkpoints go to OUT/last.pt after every epoch and OUT/checkpoint.pt at the end; "
        "per-epoch losses to OUT/train_log.jsonl. Defaults are the authors' release settings. An OUT that holds a "
        "run is refused unless --resume or --overwrite.",
    )
    parser.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="ROOT | NAME=ROOT",
        help="dataset root with meta.json, a meta.json, or a native root; repeat it to train on several datasets "
        "at once (one shuffled stream; NAME=ROOT converts a native root of the benchmark NAME)",
    )
    parser.add_argument("--dataset", default=None, help="benchmark name, to convert a native root on the fly")
    parser.add_argument("--split", default="test", help="split to train on (the release uses 'test')")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, log, feature cache)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    add_progress_argument(parser)
    add_train_arguments(parser)
    add_model_arguments(parser)
    add_config_arguments(parser)
    parser.set_defaults(func=run)


class _OldTrainingBatchFlag(argparse.Action):
    """--batch-size of train, benchmark and study, where it was the training batch: accepted as --train-batch-size
    with a notice on stderr while it lasts, so that the flag gets one meaning: the inference batch (test, predict)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        print(
            f"{option_string} is now --train-batch-size in `{parser.prog}` (the training batch); the old spelling "
            "will go",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_train_arguments(parser: argparse.ArgumentParser, data_loading: bool = True) -> None:
    """The `TrainConfig` options, shared by `vip2clip train`, `benchmark` and `study` (same names, same defaults).

    data_loading=False leaves out --skip-bad and --num-workers, for a command that already declares them with
    the same meaning for its other work (the benchmark's evaluation options); they then serve both.
    """
    group = parser.add_argument_group("training (defaults: the release's)")
    group.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
    group.add_argument(
        "--train-batch-size", type=int, default=_DEFAULTS.batch_size, metavar="N", help="training images per step"
    )
    group.add_argument(
        "--batch-size",
        dest="train_batch_size",
        type=int,
        action=_OldTrainingBatchFlag,
        default=argparse.SUPPRESS,
        metavar="N",
        help="deprecated spelling of --train-batch-size (the training batch here; it will go): --batch-size is the "
        "inference batch of test, predict, calibrate and serve",
    )
    group.add_argument(
        "--lr",
        "--lr-prompt",
        dest="lr_prompt",
        type=float,
        default=_DEFAULTS.lr_prompt,
        help="Adam learning rate of the prompt learner",
    )
    group.add_argument("--lr-fgp", type=float, default=_DEFAULTS.lr_fgp, help="Adam learning rate of FGP")
    group.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="initialisation and shuffling seed")
    group.add_argument(
        "--overwrite", action="store_true", help="replace an earlier training run in the output folder (else refused)"
    )
    group.add_argument("--no-cache", dest="cache", action="store_false", help="run the image encoder every epoch")
    group.add_argument(
        "--cache-dir", default=None, help="feature cache folder (default: feature_cache/ in the training output folder)"
    )
    group.add_argument("--cache-dtype", default=_DEFAULTS.cache_dtype, choices=["float16", "float32"])
    if data_loading:
        group.add_argument("--skip-bad", action="store_true", help="drop unreadable images / bad masks (listed)")
        group.add_argument("--num-workers", type=int, default=_DEFAULTS.num_workers, help="image loading processes")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of options added by `add_train_arguments` (ValueError for out-of-range values)."""
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        lr_prompt=args.lr_prompt,
        lr_fgp=args.lr_fgp,
        seed=args.seed,
        cache=args.cache,
        cache_dir=args.cache_dir,
        cache_dtype=args.cache_dtype,
        skip_bad=args.skip_bad,
        num_workers=args.num_workers,
    )


_SPEC_SEPARATOR = re.compile(r"\+(?=[A-Za-z0-9._-]+=)")


def split_specs(texts: Sequence[str]) -> list[str]:
    """The NAME=ROOT specs of `--train a=X b=Y` or `--train a=X+b=Y` (a '+' before the next NAME= joins them)."""
    return [part for text in texts for part in _SPEC_SEPARATOR.split(text)]


def _refuse_same_names(loaded: Sequence[tuple[str, Any, str]]) -> None:
    """CLIError when two training sources (name, index, the --data text) get one name: the advice depends on the
    form they were given in."""
    names = [name for name, _, _ in loaded]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is None:
        return
    given = [text for name, _, text in loaded if name == repeated]
    if all("=" in text and not Path(text).exists() for text in given):
        advice = "give each NAME=ROOT a NAME of its own"
    else:
        advice = "name them NAME=ROOT with a NAME of their own"
    raise CLIError(f"two training sources are both named {repeated!r} ({', '.join(given)}): {advice}")


def load_training_sources(
    texts: Sequence[str], *, dataset: str | None, split: str, world: World
) -> tuple[DatasetIndex, list[dict[str, Any]]]:
    """The training index of one or several --data/--train values (ROOT or NAME=ROOT) and the record of the
    sources with their image counts (several are merged: `data.sources.merge_sources`)."""
    from vip2clip.data.registry import resolve_index
    from vip2clip.data.sources import merge_sources, source_counts
    from vip2clip.evaluation.benchmark import load_dataset, parse_dataset_spec

    if len(texts) > 1 and dataset:
        raise CLIError("with several --data, name each one's benchmark as NAME=ROOT instead of --dataset")
    loaded = []
    with world.main_first():  # a native root is converted (and its index written) once
        for text in texts:
            named = "=" in text and not Path(text).exists()
            spec = parse_dataset_spec(text) if named else None
            if spec is None and len(texts) > 1 and Path(text).is_dir() and not (Path(text) / "meta.json").is_file():
                raise CLIError(
                    f"{text}: no meta.json here; with several --data, name its benchmark as NAME=ROOT to convert "
                    f"it (e.g. --data folder={text}; --dataset works for a single --data only)"
                )
            index = load_dataset(spec) if spec else resolve_index(text, dataset)
            loaded.append((spec.title if spec else Path(index.root).name, index, text))
    _refuse_same_names(loaded)
    loaded = [(name, index) for name, index, _ in loaded]
    if len(loaded) == 1:
        name, index = loaded[0]
        return index, [source_counts(name, index, split=split).to_dict()]
    merged = merge_sources(loaded, split)  # logs duplicates and differing image sizes
    return merged.index, merged.describe()


@holding_out_folder("train")
def run(args: argparse.Namespace) -> int:
    from vip2clip.training.loop import train
    from vip2clip.training.run_files import earlier_run

    config, context = train_config_from_args(args), run_context(args)
    world = context.world
    # refuse before the slow part: loading the model
    earlier_run(Path(args.out), resume=args.resume, overwrite=args.overwrite)
    index, sources = load_training_sources(args.data, dataset=args.dataset, split=args.split, world=world)
    model, _ = build_model(args, seed=config.seed)
    result = train(
        model,
        index,
        out_dir=args.out,
        config=config,
        split=args.split,
        resume=args.resume,
        overwrite=args.overwrite,
        run=context,
        sources=sources,
    )
    if not world.is_main:
        return 0
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}")
    print(training_summary(result.checkpoint, result.history))
    return 0


def training_summary(checkpoint: Path, history: list[dict]) -> str:
    """What a finished `train` prints: the epochs and last losses in words, where the checkpoint and the
    machine-readable per-epoch log (train_log.jsonl beside it) are, and how to use the checkpoint."""
    from vip2clip.training.run_files import TRAIN_LOG

    lines = [f"trained {len(history)} epoch(s)"]
    if history:
        last = history[-1]
        parts = ", ".join(f"{name} {last[name]:.4f}" for name in ("focal", "dice", "image") if name in last)
        lines[0] += f"; epoch {last['epoch']}: loss {last['total']:.4f} ({parts}), {last['steps']} steps"
    lines += [
        f"checkpoint: {checkpoint}",
        f"every epoch's losses (JSON Lines): {Path(checkpoint).parent / TRAIN_LOG}",
        f"use it: --checkpoint {checkpoint} (with the same --clip-weights) in test, predict and serve",
    ]
    return "\n".join(lines)
