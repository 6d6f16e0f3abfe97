"""`vip2clip test` and `vip2clip benchmark`: the evaluation protocol from the command line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.cli.common import (
    add_config_arguments,
    add_inference_arguments,
    add_model_arguments,
    add_progress_argument,
    add_reference_arguments,
    add_tiling_arguments,
    build_model,
    config_from_args,
    model_identity,
    progress_for,
    reference_cache_from_args,
    tiling_from_args,
    world_of,
)
from vip2clip.cli.explain import add_explain_argument, check_explain, explain_test
from vip2clip.cli.train import add_train_arguments, train_config_from_args
from vip2clip.config import STORAGE_DTYPES

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_test(subparsers)
    _register_benchmark(subparsers)


def _add_evaluation_arguments(parser: argparse.ArgumentParser, batch_flags: tuple[str, ...]) -> None:
    """Evaluation options; batch_flags name the inference batch size (the benchmark's --batch-size trains)."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        *batch_flags, dest="eval_batch_size", metavar="N", type=int, default=8, help="images per forward pass (8)"
    )
    group.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (0)")
    group.add_argument("--save-maps", action="store_true", help="write input | heat map | ground truth panels")
    group.add_argument("--max-maps", type=int, default=None, help="at most this many panels per class (all)")
    group.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    group.add_argument(
        "--map-dtype",
        choices=STORAGE_DTYPES,
        default="float32",
        help="maps' dtype for the pixel metrics: float32 (default) exact, as the authors' test.py, 4 bytes per normal "
        "pixel of a class; float16 rounds the maps first (~3 digits: a few hundred kB per class, but changes the "
        "pixel metrics of narrow maps, see docs/evaluation.md)",
    )
    add_progress_argument(parser)


def _eval_config(args: argparse.Namespace, classes: list[str] | None = None):
    from vip2clip.evaluation.results import EvalConfig

    if args.shots < 0:
        raise CLIError(f"--shots must be >= 0, got {args.shots}")
    return EvalConfig(
        classes=tuple(classes) if classes else None,
        batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        skip_bad=args.skip_bad,
        map_dtype=args.map_dtype,
        max_panels=args.max_maps,
        tiling=tiling_from_args(args),
        shots=args.shots,
        seed=args.seed,
        reference_cache=Path(reference_cache_from_args(args)),
    )


def _check_shots(index, config) -> None:
    """--shots larger than a class's normal train images is an error before any model is built or trained."""
    from vip2clip.evaluation.scoring import choose_shots

    if config.shots:
        choose_shots(index, list(config.classes or index.classes(config.split)), config.shots, config.seed)


def _add_paper_argument(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument(
        "--reference", choices=("paper",), default=None,
        help=f"add the paper's ViP²-CLIP numbers and our difference to them to the tables: {where}",
    )  # fmt: skip


def _test_paper(args: argparse.Namespace, name: str):
    """The --reference of `test`, refused early when it has no numbers for the dataset being tested."""
    from vip2clip.evaluation.paper import load_paper_numbers

    if not args.reference:
        return None
    paper = load_paper_numbers(args.reference)
    if paper.row_for(name) is None and paper.class_mean(name) is None:
        raise CLIError(
            f"--reference {args.reference}: it has no numbers for {name!r}; name the benchmark with --dataset "
            f"(the {args.reference} reports: {', '.join(sorted(paper.rows))})"
        )
    return paper


def _register_test(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("test", help="evaluate a checkpoint on a dataset (per-class table, thresholds)")
    parser.add_argument("--data", required=True, help="dataset root or its meta.json")
    parser.add_argument("--dataset", default=None, help="benchmark name, to convert a native root on the fly")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--classes", nargs="+", default=None, help="only these classes")
    _add_paper_argument(parser, "per class (Tables 10-21) and for the mean (Tables 1-2)")
    _add_evaluation_arguments(parser, ("--batch-size", "--eval-batch-size"))
    add_explain_argument(parser, "explain/CLASS/NAME.png for the images of the --save-maps panels")
    add_tiling_arguments(parser)
    add_reference_arguments(parser, shots=True, seed=True)
    add_model_arguments(parser)
    add_inference_arguments(parser)  # only these: the architecture comes from the checkpoint
    parser.set_defaults(func=run_test)


def run_test(args: argparse.Namespace) -> int:
    from vip2clip.data.registry import dataset_info, resolve_index
    from vip2clip.evaluation.benchmark import evaluate_dataset
    from vip2clip.evaluation.reports import class_paper_markdown, class_table_markdown

    if not args.checkpoint:
        raise CLIError("--checkpoint is required (a vip2clip or release checkpoint to evaluate)")
    config = _eval_config(args, args.classes)
    check_explain(args, {"--tile": args.tile, "--shots": args.shots}, args.save_maps)
    world = world_of(args)
    with world.main_first():  # a native root is converted (and its index written) once
        index = resolve_index(args.data, args.dataset)
    _check_shots(index, config)
    name = dataset_info(args.dataset).title if args.dataset else Path(index.root).name
    paper = _test_paper(args, name)
    model = build_model(args, **config_from_args(args))
    out = Path(args.out)
    identity = model_identity(args, model)
    result = evaluate_dataset(
        model, index, out, config, name, identity, args.save_maps, progress=progress_for(args), world=world,
        paper=paper,
    )  # fmt: skip
    if not world.is_main:
        return 0
    print(class_table_markdown(result, name))
    if paper is not None:
        print(class_paper_markdown(result, paper, name))
    print(f"results: {out / 'results.md'} (+ .csv, .json)")
    if (out / "calibration.json").is_file():
        print(f"thresholds: {out / 'calibration.json'}")
    if args.save_maps:
        print(f"panels: {out / 'maps'}")
    if args.explain:
        explain_test(args, model, index, [c.name for c in result.classes], result.image_threshold)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable file(s); listed in results.json")
    if config.shots:
        print(f"references: {config.shots} normal train image(s) per class (seed {config.seed}); see results.json")
    without_mask = sum(c.n_without_mask for c in result.classes)
    if without_mask:
        print(f"{without_mask} anomalous image(s) have no mask: left out of the pixel metrics (n_without_mask in "
              "results.json)")  # fmt: skip
    return 0


def _register_benchmark(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="train once (or take --checkpoint), evaluate zero-shot on several datasets (Table 1/2)"
    )
    parser.add_argument("--train", default=None, metavar="NAME=ROOT", help="dataset to train on (its test split)")
    parser.add_argument("--test", nargs="+", required=True, metavar="NAME=ROOT", help="datasets to evaluate")
    parser.add_argument("--out", required=True, help="output folder")
    _add_paper_argument(parser, "per dataset (Tables 1-2) and in each dataset's results per class")
    _add_evaluation_arguments(parser, ("--eval-batch-size",))
    add_tiling_arguments(parser)
    add_reference_arguments(parser, shots=True)  # the --shots images are drawn with the training's --seed
    add_model_arguments(parser)
    add_config_arguments(parser)
    add_train_arguments(parser, data_loading=False)  # --skip-bad, --num-workers: the evaluation's serve both
    parser.set_defaults(func=run_benchmark)


def _train_for_benchmark(args: argparse.Namespace, train_spec, out: Path):
    """Train a fresh model on the --train dataset; returns (model, checkpoint path, training record)."""
    from vip2clip.evaluation.benchmark import load_dataset
    from vip2clip.training.loop import train

    config, world = train_config_from_args(args), world_of(args)
    with world.main_first():
        index = load_dataset(train_spec)
    model = build_model(args, seed=config.seed, **config_from_args(args))  # seeded like `vip2clip train`
    result = train(
        model, index, out / "train", config, progress=progress_for(args), overwrite=args.overwrite, world=world
    )
    record = {"name": train_spec.title, "root": str(index.root), "config": config.to_dict(), "trained": True}
    return model, result.checkpoint, record


def run_benchmark(args: argparse.Namespace) -> int:
    from vip2clip.evaluation.benchmark import benchmark_datasets, load_dataset, parse_dataset_spec
    from vip2clip.evaluation.paper import load_paper_numbers
    from vip2clip.evaluation.reports import benchmark_table_markdown
    from vip2clip.model.identity import ModelIdentity

    if not args.train and not args.checkpoint:
        raise CLIError("give --train NAME=ROOT (to train first) or --checkpoint CKPT")
    paper = load_paper_numbers(args.reference) if args.reference else None
    train_spec = parse_dataset_spec(args.train) if args.train else None
    tests = [parse_dataset_spec(text) for text in args.test]
    config = _eval_config(args)
    out, world = Path(args.out), world_of(args)
    if train_spec is not None and not args.checkpoint:
        from vip2clip.training.loop import earlier_run

        try:  # before any slow work
            earlier_run(out / "train", resume=False, overwrite=args.overwrite)
        except ValueError:
            raise CLIError(
                f"{out / 'train'} holds an earlier training run: pass --overwrite to train again, evaluate it with "
                f"--checkpoint {out / 'train' / 'checkpoint.pt'}, or choose another --out"
            ) from None
    with world.main_first():
        indexes = [(spec, load_dataset(spec)) for spec in tests]  # all errors in the data before training
    for _, index in indexes:
        _check_shots(index, config)
    if train_spec is not None:
        for spec in tests:
            if spec.root.resolve() == train_spec.root.resolve():
                logger.warning("%s is also the training set: its numbers are not zero-shot", spec.title)
    if args.checkpoint:
        model, checkpoint = build_model(args, **config_from_args(args)), args.checkpoint
        training = {"name": train_spec.title if train_spec else None, "trained": False}
    else:
        model, checkpoint, training = _train_for_benchmark(args, train_spec, out)
    identity = ModelIdentity.of(model, checkpoint)
    entries = benchmark_datasets(
        model, indexes, out, config, identity, training, args.save_maps, progress_for(args), paper, world
    )
    if not world.is_main:
        return 0
    print(benchmark_table_markdown(entries, paper=paper))
    print(f"benchmark: {out / 'benchmark.md'} (+ .csv, .json); per dataset: {', '.join(s.folder for s in tests)}")
    return 0
