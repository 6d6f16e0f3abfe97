"""`--explain` of `predict` and `test --save-maps`: the paper's explanatory pictures, one panel per image
(`vip2clip.runs.explain_run`). Kept here so that the commands add one option, one check and one call."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.cli.common import progress_for


def add_explain_argument(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument(
        "--explain",
        action="store_true",
        help=f"also write {where}: per tapped layer the anomaly map (paper Fig. 7) and where the normal and the "
        "anomalous prompt look (FGP attention, Fig. 3), beside the fused map",
    )


def check_explain(args: argparse.Namespace, conflicting: dict[str, object], *, save_maps: bool = True) -> None:
    """--explain draws the plain model's layers and attention: refused with the options (flag -> value) that
    replace or hide them, and without `save_maps` (test: it explains the images of the panels)."""
    if not args.explain:
        return
    if not save_maps:
        raise CLIError("--explain goes with --save-maps (it explains the images the panels show)")
    given = [flag for flag, value in conflicting.items() if value]
    if given:
        raise CLIError(
            f"--explain shows the plain model's layers and prompts; not with {', '.join(given)} (its score and "
            "decision would contradict the run's; explain in a run without them)"
        )


def explain_test(args: argparse.Namespace, model, *, index, classes: list[str], image_threshold: float) -> None:
    """`test --save-maps --explain`: OUT/explain/CLASS/NAME.png for the images of the panels."""
    from vip2clip.evaluation.panels import THRESHOLD_SOURCE, explain_items
    from vip2clip.runs.explain_run import EXPLAIN_DIR, Decision, write_explanations

    decision = Decision(None if math.isnan(image_threshold) else image_threshold, THRESHOLD_SOURCE)
    items = explain_items(index, classes, limit=args.max_maps)
    written = write_explanations(
        model, items, out_dir=args.out, decision=decision, batch_size=args.eval_batch_size, progress=progress_for(args)
    )
    print(f"explanations: {Path(args.out) / EXPLAIN_DIR} ({written} panels)")


def explain_predictions(args: argparse.Namespace, predictor) -> None:
    """`predict --explain`: OUT/explain/KEY.png for every judged image of the run."""
    from vip2clip.runs.explain_run import EXPLAIN_DIR, Decision, prediction_items, write_explanations
    from vip2clip.runs.run_outputs import panel_threshold_source

    thresholds = predictor.thresholds
    decision = Decision(thresholds.image, panel_threshold_source(thresholds))
    items = prediction_items(args.out)
    written = write_explanations(
        predictor.model,
        items,
        out_dir=args.out,
        decision=decision,
        batch_size=args.batch_size,
        progress=progress_for(args),
    )
    print(f"explanations: {Path(args.out) / EXPLAIN_DIR} ({written} panels)")
