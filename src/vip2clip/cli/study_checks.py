"""`vip2clip study`'s checks of its options before any model is built, and what its report must say about the run:
the variants asked for, the Top-K mode and grid, the data not used, the settings recorded in study_settings.json,
and whether the run may be compared with the paper (`paper.comparability`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vip2clip.cli import CLIError

if TYPE_CHECKING:
    from vip2clip.data.index import DatasetIndex
    from vip2clip.paper.comparability import Comparability
    from vip2clip.paper.studies import Study, Variant

logger = logging.getLogger(__name__)


def add_study_mode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top-k-at-test",
        action="store_true",
        help="top-k study: train one model at K = 50 and vary K at test time only (cheaper; default: one training "
        "per K, since K also shapes the training loss)",
    )


def chosen_study(args: argparse.Namespace) -> tuple[Study, tuple[Variant, ...]]:
    """The study (the Top-K study as a test-time sweep with --top-k-at-test) and the variants --variants names;
    CLIError for --variants naming none."""
    from vip2clip.paper.studies import get_study, top_k_at_test_time

    study = get_study(args.name)
    if args.top_k_at_test:
        if study.name != "top-k":
            raise CLIError(f"--top-k-at-test is an option of the top-k study, not of {study.name}")
        study = top_k_at_test_time(study)
    if args.variants is None:
        return study, study.select(None)
    keys = [key.strip() for key in args.variants.split(",") if key.strip()]
    if not keys:
        raise CLIError(f"--variants {args.variants!r} names no variant; the study's variants: {study.variant_keys()}")
    return study, study.select(keys)


def check_top_k(args: argparse.Namespace, variants: Sequence[Variant]) -> None:
    """CLIError for a Top-K larger than the patch grid of the backbone at the run's input size (every K beyond it
    pools all patches: the points would repeat one another)."""
    from vip2clip.config import DEFAULT_BACKBONE, ModelConfig
    from vip2clip.model.presets import backbone_of, get_preset, is_preset
    from vip2clip.model.weights import patch_size

    backbone = backbone_of(args.backbone) or DEFAULT_BACKBONE
    preset_size = get_preset(args.backbone).image_size if is_preset(args.backbone) else None
    size = args.image_size or preset_size or ModelConfig.image_size
    patches = (size // patch_size(backbone)) ** 2
    too_large = [
        f"{variant.key} (K = {k})"
        for variant in variants
        for k in [{**variant.options, **variant.test_options}.get("top_k")]
        if k is not None and k > patches
    ]
    if too_large:
        raise CLIError(
            f"Top-K larger than the {patches} patches of a {size}-px image on {backbone}: {', '.join(too_large)}; "
            "choose --variants with a smaller K or a larger --image-size"
        )


def warn_unused_data(given: Sequence[str], used: Sequence[str]) -> None:
    """A warning naming every --data entry the study's protocol does not read."""
    unused = [name for name in given if name not in used]
    if unused:
        logger.warning("--data %s: not used by this study (it reads %s); ignored", ", ".join(unused), ", ".join(used))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The model settings every variant shares (study_settings.json): random_init is true whenever the backbone
    has random weights (no --clip-weights, e.g. the tiny test backbone), not only with --random-init."""
    return {
        "backbone": args.backbone,
        "clip_weights": args.clip_weights,
        "random_init": bool(args.random_init or not args.clip_weights),
        "image_size": args.image_size,
        "precision": args.precision,
    }


def report_context(
    settings: Mapping[str, Any], study: Study, *, indexes: Mapping[str, DatasetIndex], split: str = "test"
) -> tuple[Comparability, list[str]]:
    """(what of the run may be compared with the paper, the notes under its table: empty classes)."""
    from vip2clip.evaluation.paper_numbers import load_paper_numbers
    from vip2clip.paper.comparability import compare_run

    tests = [name for direction in study.protocol for name in direction.tests]
    classes = {name: indexes[name].classes(split) for name in tests}
    comparison = compare_run(settings, classes, reference=load_paper_numbers("paper"))
    notes = []
    for name in dict.fromkeys(tests):
        empty = [cls for cls, samples in indexes[name].splits.get(split, {}).items() if not samples]
        if empty:
            notes.append(
                f"{name}: class(es) {', '.join(empty)} have no {split} image: not in the table, its means or the "
                "paper's comparison"
            )
    return comparison, notes
