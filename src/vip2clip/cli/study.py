"""`vip2clip study NAME`: one of the paper's studies (Tables 4, 5, 6, 9; Figs. 5, 6, 10), end to end, resumably."""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.cli.common import (
    add_model_arguments,
    add_progress_argument,
    holding_out_folder,
    model_spec_from_args,
    run_context,
    world_of,
)
from vip2clip.cli.efficiency import add_efficiency_arguments, run_efficiency
from vip2clip.cli.evaluate import add_map_dtype_argument
from vip2clip.cli.study_checks import (
    add_study_mode_arguments,
    check_top_k,
    chosen_study,
    report_context,
    run_settings,
    warn_unused_data,
)
from vip2clip.cli.train import add_train_arguments, split_specs, train_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run one of the paper's studies (ablations, Top-K, prompt length, medical fine-tuning) with the paper's "
        "numbers beside ours",
        description="Trains every variant of the study on the protocol's training sets and tests it zero-shot; "
        "writes OUT/study.{md,csv,json} (and figure.png/.csv for a figure). Variants share one feature cache; a "
        "re-run reads finished variants back and continues a killed study. `vip2clip study --list` lists them.",
    )
    parser.add_argument("name", nargs="?", default=None, help="the study (see --list)")
    parser.add_argument("--list", action="store_true", help="list the studies, their variants and what they reproduce")
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="NAME=ROOT",
        help="the roots of the datasets the study's protocol uses (e.g. mvtec=/data/mvtec visa=/data/visa)",
    )
    parser.add_argument(
        "--train",
        nargs="+",
        default=None,
        metavar="NAME=ROOT",
        help="instead of the paper's protocol: train on these (one stream) ...",
    )
    parser.add_argument("--test", nargs="+", default=None, metavar="NAME=ROOT", help="... and test on these")
    parser.add_argument("--out", default=None, help="the study's folder (resumable)")
    parser.add_argument("--variants", default=None, metavar="A,B", help="run only these variants (default: all)")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        metavar="SEED",
        help="one model per seed; cells show mean ± std (default: --seed)",
    )
    add_study_mode_arguments(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-batch-size", type=int, default=8, help="images per test batch (8)")
    add_map_dtype_argument(group)
    add_efficiency_arguments(parser)
    add_progress_argument(parser)
    add_train_arguments(parser)
    add_model_arguments(parser, checkpoint=False)
    parser.set_defaults(func=run)


def _datasets(args: argparse.Namespace, study):
    """(study with the protocol to run, {registry name: DatasetIndex}, title of a name)."""
    from dataclasses import replace

    from vip2clip.evaluation.benchmark import load_dataset, parse_dataset_spec
    from vip2clip.paper.studies import Direction

    if (args.train is None) != (args.test is None):
        raise CLIError("--train and --test go together (a protocol of your own); without them: --data")
    texts = split_specs(args.data + (args.train or []) + (args.test or []))
    specs = {}
    for spec in (parse_dataset_spec(text) for text in texts):
        specs[_key(spec)] = spec
    if args.train is not None:
        train = tuple(_key(parse_dataset_spec(t)) for t in split_specs(args.train))
        tests = tuple(_key(parse_dataset_spec(t)) for t in args.test)
        study = replace(study, protocol=(Direction(train, tests),))
    if study.partial_data and args.train is None:  # the datasets not given are listed as missing
        try:
            study = study.restricted(specs)
        except ValueError as error:
            raise CLIError(f"{error}: pass --data NAME=ROOT for them") from None
    missing = [name for name in study.datasets if name not in specs]
    if missing:
        raise CLIError(
            f"study {study.name} needs the roots of {', '.join(missing)}: pass --data "
            + " ".join(f"{name}=ROOT" for name in missing)
        )
    warn_unused_data(list(specs), study.datasets)
    with world_of(args).main_first():
        indexes = {name: load_dataset(specs[name]) for name in study.datasets}
    return study, indexes, lambda name: specs[name].title if name in specs else name


def _key(spec) -> str:
    """A dataset's key in a study: its registry name (so that the paper's numbers match), else its label."""
    from vip2clip.data.registry import dataset_info

    try:
        return dataset_info(spec.name).name
    except ValueError:
        return spec.name


def _factory(args: argparse.Namespace):
    """The study's model builder: every model it builds runs on one frozen CLIP (`SharedBackbones`)."""
    from vip2clip.factory import SharedBackbones
    from vip2clip.inference.assembly import build_model

    shared = SharedBackbones()

    def build(options, seed, checkpoint):
        settings = copy.copy(args)
        settings.checkpoint = str(checkpoint) if checkpoint is not None else None
        spec = model_spec_from_args(settings, seed=seed)
        return build_model(replace(spec, config={**spec.config, **dict(options)}), shared)[0]

    return build


@holding_out_folder("study")
def run(args: argparse.Namespace) -> int:
    from vip2clip.evaluation.results import EvalConfig
    from vip2clip.paper.studies import EFFICIENCY, describe_studies
    from vip2clip.paper.study import StudyPlan, run_study, select_seeds
    from vip2clip.paper.study_report import write_study

    if args.list:
        print(describe_studies())
        return 0
    if not args.name or not args.out:
        raise CLIError("give a study NAME and --out DIR (or --list)")
    if args.name == EFFICIENCY.name:
        return run_efficiency(args)
    study, variants = chosen_study(args)
    check_top_k(args, variants)
    seeds = select_seeds(args.seeds, args.seed)
    study, indexes, titles = _datasets(args, study)
    run = run_context(args)
    settings = run_settings(args)
    plan = StudyPlan(
        study=study,
        variants=variants,
        seeds=seeds,
        datasets=indexes,
        train_config=train_config_from_args(args),
        eval_config=EvalConfig(
            batch_size=args.eval_batch_size,
            num_workers=args.num_workers,
            skip_bad=args.skip_bad,
            map_dtype=args.map_dtype,
            cache_dtype=args.cache_dtype,
        ),
        settings=settings,
    )
    results = run_study(plan, args.out, build=_factory(args), overwrite=args.overwrite, run=run)
    if not run.world.is_main:
        return 0
    comparison, notes = report_context(settings, study, indexes=indexes)
    written = write_study(
        args.out,
        study,
        variants=variants,
        seeds=seeds,
        results=results,
        titles=titles,
        comparison=comparison,
        notes=notes,
    )
    print(Path(written["markdown"]).read_text(encoding="utf-8"))
    print(f"study: {written['markdown']} (+ .csv, .json)")
    if "figure" in written:
        print(f"figure: {written['figure']} (+ figure.csv)")
    if "figure_note" in written:
        print(f"note: {written['figure_note']}")
    return 0
