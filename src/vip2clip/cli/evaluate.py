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
    add_mutual_arguments,
    add_progress_argument,
    add_reference_arguments,
    add_tiling_arguments,
    build_model,
    holding_out_folder,
    mutual_from_args,
    reference_cache_from_args,
    run_context,
    tiling_from_args,
)
from vip2clip.cli.explain import add_explain_argument, check_explain, explain_test
from vip2clip.cli.train import add_train_arguments, train_config_from_args
from vip2clip.config import STORAGE_DTYPES
from vip2clip.model.presets import is_untrained

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_test(subparsers)
    _register_benchmark(subparsers)


def add_map_dtype_argument(group: argparse._ArgumentGroup) -> None:
    """--map-dtype, the maps' dtype for the pixel statistics (test, benchmark, study)."""
    group.add_argument(
        "--map-dtype",
        choices=STORAGE_DTYPES,
        default="float32",
        help="maps' dtype for the pixel metrics: float32 (default) exact, as the authors' test.py, 4 bytes per normal "
        "pixel of a class; float16 rounds the maps first (~3 digits: a few hundred kB per class, but changes the "
        "pixel metrics of narrow maps, see docs/evaluation.md)",
    )


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
    add_map_dtype_argument(group)
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
        mutual=mutual_from_args(args),
    )


def _check_shots(index, config) -> None:
    """--shots or --mutual that a class's images cannot serve is an error before any model is built or trained."""
    from vip2clip.evaluation.class_scoring import check_mutual_classes, choose_shots

    if config.shots:
        choose_shots(index, list(config.classes or index.classes(config.split)), shots=config.shots, seed=config.seed)
    if config.mutual is not None:
        check_mutual_classes(index, split=config.split, classes=config.classes)


def _add_paper_argument(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument(
        "--reference",
        choices=("paper", "paper-clip"),
        default=None,
        help=f"add the paper's numbers (paper-clip: its CLIP column) and our difference to them to the tables: {where}",
    )


def _test_paper(args: argparse.Namespace, name: str):
    """The --reference of `test`, refused early when it has no numbers for the dataset being tested."""
    from vip2clip.evaluation.paper_numbers import load_paper_numbers

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
    add_mutual_arguments(parser)
    add_model_arguments(parser)
    add_inference_arguments(parser)  # only these: the architecture comes from the checkpoint
    parser.set_defaults(func=run_test)


def run_test(args: argparse.Namespace) -> int:
    from vip2clip.data.registry import dataset_info, resolve_index
    from vip2clip.data.zero_shot import count_test_overlap
    from vip2clip.evaluation.benchmark import evaluate_dataset
    from vip2clip.evaluation.reports import class_paper_markdown, class_table_markdown

    if not args.checkpoint and not is_untrained(args.backbone):
        raise CLIError("--checkpoint is required (a vip2clip or release checkpoint), or --backbone clip-zero-shot")
    config = _eval_config(args, args.classes)
    check_explain(args, {"--tile": args.tile, "--shots": args.shots, "--mutual": args.mutual}, save_maps=args.save_maps)
    run = run_context(args)
    world = run.world
    with world.main_first():  # a native root is converted (and its index written) once
        index = resolve_index(args.data, args.dataset)
    _check_shots(index, config)
    name = dataset_info(args.dataset).title if args.dataset else Path(index.root).name
    paper = _test_paper(args, name)
    model, identity = build_model(args)
    out = Path(args.out)
    training = checkpoint_training(args.checkpoint, is_untrained(args.backbone))
    overlap = count_test_overlap(
        training["digests"], index, split=config.split, classes=config.classes, skip_bad=config.skip_bad
    )
    note = overlap.note()
    record = {**training["record"], "zero_shot": overlap.to_dict()}
    result = evaluate_dataset(
        model,
        index,
        out_dir=out,
        config=config,
        name=name,
        identity=identity,
        save_maps=args.save_maps,
        notes=[note] if note else (),
        run=run,
        paper=paper,
        training=record,
    )
    if not world.is_main:
        return 0
    print(class_table_markdown(result, name))
    if paper is not None:
        print(class_paper_markdown(result, paper, dataset=name))
    if note:
        print(f"note: {note}")
    print(f"results: {out / 'results.md'} (+ .csv, .json)")
    if (out / "calibration.json").is_file():
        print(f"thresholds: {out / 'calibration.json'}")
    if args.save_maps:
        print(f"panels: {out / 'maps'}")
    if args.explain:
        classes = [c.name for c in result.classes]
        explain_test(args, model, index=index, classes=classes, image_threshold=result.image_threshold)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable file(s); listed in results.json")
    if config.shots:
        print(f"references: {config.shots} normal train image(s) per class (seed {config.seed}); see results.json")
    if config.mutual:
        print(
            f"mutual scoring: each class's test images scored each other (at most {config.mutual.max_others} "
            f"others per image, share {config.mutual.share}, weight {config.mutual.weight})"
        )
    without_mask = sum(c.n_without_mask for c in result.classes)
    if without_mask:
        print(
            f"{without_mask} anomalous image(s) have no mask: left out of the pixel metrics (n_without_mask in "
            "results.json)"
        )
    return 0


def checkpoint_training(checkpoint: str | None, untrained: bool = False) -> dict:
    """What a checkpoint says about its training: {"digests": its `TrainedImages` (empty: untrained) or None
    (unknown: older or release format), "record": its sources, for results.json}. CLIError for a damaged record."""
    from vip2clip.data.zero_shot import TrainedImages, training_digests
    from vip2clip.model.checkpoint import load_checkpoint

    if checkpoint is None:
        return {"digests": TrainedImages(set()) if untrained else None, "record": {}}  # untrained: saw no image
    meta = load_checkpoint(checkpoint).meta
    record = {"checkpoint": str(checkpoint), "sources": meta.get("sources"), "dataset": meta.get("dataset")}
    try:
        return {"digests": training_digests(meta), "record": record}
    except ValueError as error:
        raise CLIError(f"{checkpoint}: {error}") from None


def _register_benchmark(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="train once (or take --checkpoint), evaluate zero-shot on several datasets (Table 1/2)"
    )
    parser.add_argument(
        "--train",
        nargs="+",
        default=None,
        metavar="NAME=ROOT",
        help="dataset(s) to train on (their test split); several (NAME=ROOT NAME=ROOT, or NAME=ROOT+NAME=ROOT) "
        "form one shuffled training stream",
    )
    parser.add_argument("--test", nargs="+", required=True, metavar="NAME=ROOT", help="datasets to evaluate")
    parser.add_argument("--out", required=True, help="output folder")
    _add_paper_argument(parser, "per dataset (Tables 1-2) and in each dataset's results per class")
    parser.add_argument(
        "--allow-overlap",
        action="store_true",
        help="test on a dataset holding training images (marked 'not zero-shot'); images are compared by their "
        "decoded pixels: copies count, also re-saved ones; re-encoded near-duplicates (PNG -> JPEG) do not",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="SEED",
        help="train one model per seed (OUT/seed-N/) and report mean and standard deviation per cell",
    )
    _add_evaluation_arguments(parser, ("--eval-batch-size",))
    add_tiling_arguments(parser)
    add_reference_arguments(parser, shots=True)  # the --shots images are drawn with the training's --seed
    add_mutual_arguments(parser)
    add_model_arguments(parser)
    add_config_arguments(parser)
    add_train_arguments(parser, data_loading=False)  # --skip-bad, --num-workers: the evaluation's serve both
    parser.set_defaults(func=run_benchmark)


def refuse_overlaps(overlaps: dict, titles: dict[str, str], *, allow: bool) -> None:
    """CLIError naming every test dataset that holds training images, unless `allow`; the unknown case is
    said once (a warning)."""
    from vip2clip.data.zero_shot import UNKNOWN_NOTE

    shared = [f"{titles[key]}: {overlap.note()}" for key, overlap in overlaps.items() if overlap.shared]
    if shared and not allow:
        raise CLIError(
            "refusing to report these as zero-shot results:\n  "
            + "\n  ".join(shared)
            + "\nchoose test sets the model was not trained on, or pass --allow-overlap (the results are then "
            "marked 'not zero-shot')"
        )
    for key, overlap in overlaps.items():  # the refused ones allowed, or an older checkpoint's byte comparison
        if overlap.known and overlap.note():
            logger.warning("%s: %s", titles[key], overlap.note())
    if any(not overlap.known for overlap in overlaps.values()):
        logger.warning("%s", UNKNOWN_NOTE)


def _train_for_benchmark(args: argparse.Namespace, index, *, sources, out: Path, seed: int):
    """Train a fresh model on the --train data; returns (model, checkpoint path, training record)."""
    from dataclasses import replace

    from vip2clip.training.loop import train

    config = replace(train_config_from_args(args), seed=seed)
    if args.seeds and config.cache_dir is None:  # the seeds' runs read one feature cache
        config = replace(config, cache_dir=str(Path(args.out) / "feature_cache"))
    model, _ = build_model(args, seed=config.seed)  # seeded like `vip2clip train`
    result = train(
        model,
        index,
        out_dir=out / "train",
        config=config,
        overwrite=args.overwrite,
        run=run_context(args),
        sources=sources,
    )
    record = {
        "name": "+".join(s["name"] for s in sources),
        "root": str(index.root),
        "sources": sources,
        "config": config.to_dict(),
        "trained": True,
    }
    return model, result.checkpoint, record


def _benchmark_plan(args: argparse.Namespace, out: Path) -> list[tuple[int, Path]]:
    """(seed, output folder) of each model to train and evaluate; refuses an earlier run before any slow work."""
    from vip2clip.training.run_files import earlier_run

    if not args.seeds:
        plan = [(args.seed, out)]
    elif len(set(args.seeds)) != len(args.seeds):
        raise CLIError(f"--seeds lists a seed twice: {args.seeds}")
    else:
        plan = [(seed, out / f"seed-{seed}") for seed in args.seeds]
    for _, folder in plan if args.train and not args.checkpoint else []:
        try:
            earlier_run(folder / "train", resume=False, overwrite=args.overwrite)
        except ValueError:
            raise CLIError(
                f"{folder / 'train'} holds an earlier training run: pass --overwrite to train again, evaluate it with "
                f"--checkpoint {folder / 'train' / 'checkpoint.pt'}, or choose another --out"
            ) from None
    return plan


@holding_out_folder("benchmark")
def run_benchmark(args: argparse.Namespace) -> int:
    from vip2clip.cli.train import load_training_sources, split_specs
    from vip2clip.data.zero_shot import TrainedImages, count_test_overlap, index_digests
    from vip2clip.evaluation.benchmark import benchmark_datasets, check_test_folders, load_dataset, parse_dataset_spec
    from vip2clip.evaluation.paper_numbers import load_paper_numbers
    from vip2clip.evaluation.reports import benchmark_table_markdown
    from vip2clip.model.identity import ModelIdentity

    untrained = is_untrained(args.backbone)
    if untrained and (args.train or args.checkpoint or args.seeds):
        raise CLIError(f"--backbone {args.backbone} is untrained CLIP: give no --train, --checkpoint or --seeds")
    if not args.train and not args.checkpoint and not untrained:
        raise CLIError("give --train NAME=ROOT (to train first), --checkpoint CKPT or --backbone clip-zero-shot")
    if args.seeds and args.checkpoint:
        raise CLIError("--seeds trains one model per seed: give --train NAME=ROOT instead of --checkpoint")
    paper = load_paper_numbers(args.reference) if args.reference else None
    train_texts = split_specs(args.train) if args.train else []
    tests = [parse_dataset_spec(text) for text in args.test]
    check_test_folders(tests)
    config = _eval_config(args)
    out, run = Path(args.out), run_context(args)
    world = run.world
    plan = _benchmark_plan(args, out)
    with world.main_first():
        indexes = [(spec, load_dataset(spec)) for spec in tests]  # all errors in the data before training
    for _, index in indexes:
        _check_shots(index, config)
    if args.checkpoint or untrained:
        training = checkpoint_training(args.checkpoint, untrained)
        trained, index, sources = training["digests"], None, None
    else:
        for text in train_texts:
            parse_dataset_spec(text)  # NAME=ROOT, as --test
        index, sources = load_training_sources(train_texts, dataset=None, split="test", world=world)
        trained = TrainedImages(set(index_digests(index, "test", skip_bad=args.skip_bad)))
    overlaps = {spec.folder: count_test_overlap(trained, idx, skip_bad=args.skip_bad) for spec, idx in indexes}
    refuse_overlaps(overlaps, {spec.folder: spec.title for spec in tests}, allow=args.allow_overlap)
    runs = {}
    for seed, folder in plan:
        if args.checkpoint or untrained:
            model, identity = build_model(args)
            names = "+".join(parse_dataset_spec(text).title for text in train_texts) or None
            record = {"name": names, "trained": False, **training["record"]}
        else:
            model, checkpoint, record = _train_for_benchmark(args, index, sources=sources, out=folder, seed=seed)
            identity = ModelIdentity.of(model, checkpoint)
        runs[seed] = benchmark_datasets(
            model,
            indexes,
            out_dir=folder,
            config=config,
            identity=identity,
            training=record,
            save_maps=args.save_maps,
            run=run,
            paper=paper,
            overlaps=overlaps,
        )
    if not world.is_main:
        return 0
    if args.seeds:
        from vip2clip.paper.seeds import seeds_table_markdown, write_seed_benchmark

        write_seed_benchmark(out, runs, reference=paper)
        print(seeds_table_markdown(runs, paper))
    else:
        print(benchmark_table_markdown(runs[plan[0][0]], paper=paper))
    print(f"benchmark: {out / 'benchmark.md'} (+ .csv, .json); per dataset: {', '.join(s.folder for s in tests)}")
    return 0
