"""`vip2clip convert`, `vip2clip validate` and `vip2clip synth`: building and checking dataset indexes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.data.converters.common import ConvertOptions
from vip2clip.data.index import DatasetIndex, write_index
from vip2clip.data.registry import DATASETS, convert_dataset, dataset_info
from vip2clip.data.synthetic import STYLES, generate_benchmark
from vip2clip.data.validate import validate_index, validate_path


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser("convert", help="index a benchmark in its native layout (writes meta.json)")
    convert.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    convert.add_argument("--root", required=True, help="the dataset's root folder")
    convert.add_argument("--out", default=None, help="index file to write (default ROOT/meta.json)")
    convert.add_argument("--strict", action="store_true", help="treat warnings (missing masks ...) as errors")
    convert.add_argument("--check-images", action="store_true", help="also decode every image and mask")
    convert.add_argument("--seed", type=int, default=0, help="KSDD: seed of the 75/25 split of normal crops")
    convert.set_defaults(func=run_convert)

    validate = subparsers.add_parser("validate", help="check a meta.json against the files on disk")
    validate.add_argument("root", help="a meta.json or the folder holding it")
    validate.add_argument("--quick", action="store_true", help="read image headers only (no full decode)")
    validate.set_defaults(func=run_validate)

    synth = subparsers.add_parser("synth", help="write a seeded synthetic benchmark in MVTec layout")
    synth.add_argument("--out", required=True, help="output folder (new, empty, or an earlier synthetic set)")
    synth.add_argument("--classes", type=int, default=2)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--style", choices=STYLES, default="textured")
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--train-good", type=int, default=4, help="normal training images per class")
    synth.add_argument("--test-good", type=int, default=6, help="normal test images per class")
    synth.add_argument("--test-defect", type=int, default=6, help="anomalous test images per class")
    synth.set_defaults(func=run_synth)


def count_lines(index: DatasetIndex, split: str = "test") -> list[str]:
    """`CLASS: N normal, M anomalous, K masks` per class, then `total: ...` (a stable, parseable table)."""
    counts = index.counts(split)
    lines = [f"{c.cls_name}: {c.normal} normal, {c.anomalous} anomalous, {c.masks} masks" for c in counts]
    totals = [sum(getattr(c, name) for c in counts) for name in ("normal", "anomalous", "masks")]
    return [*lines, "total: {} normal, {} anomalous, {} masks".format(*totals)]


def run_convert(args: argparse.Namespace) -> int:
    info = dataset_info(args.dataset)
    result = convert_dataset(info.name, args.root, options=ConvertOptions(strict=args.strict, seed=args.seed))
    if args.check_images:
        report = validate_index(result.index)
        result.warnings += [finding.line() for finding in report.problems]
        if args.strict and report.problems:
            raise CLIError(
                f"{len(report.problems)} unreadable or inconsistent file(s) with --strict:\n  "
                + "\n  ".join(finding.line() for finding in report.problems)
            )
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    written = write_index(result.index, args.out)
    print(f"{info.title}: wrote {written} ({len(result.index.samples('train'))} train samples)")
    print("\n".join(count_lines(result.index)))
    if info.paper_counts is not None:
        print("paper (Table 7): {} normal, {} anomalous".format(*info.paper_counts))
    if result.warnings:
        print(f"{len(result.warnings)} warning(s): see above", file=sys.stderr)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    report = validate_path(Path(args.root), decode=not args.quick)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def run_synth(args: argparse.Namespace) -> int:
    index = generate_benchmark(
        args.out,
        classes=args.classes,
        seed=args.seed,
        image_size=args.image_size,
        n_train_good=args.train_good,
        n_test_good=args.test_good,
        n_test_defect=args.test_defect,
        style=args.style,
    )
    print(f"synthetic benchmark ({args.style}, seed {args.seed}): wrote {Path(args.out) / 'meta.json'}")
    print("\n".join(count_lines(index)))
    return 0
