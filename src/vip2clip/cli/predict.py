"""`vip2clip predict` and `vip2clip calibrate`: the practitioner's commands on files and folders.

Exit codes of `predict`: 0 every image found was judged (normal or anomalous); 1 the results are written but some
images could not be judged (unreadable files, NaN/infinite model output: rows with pred_label "error") or some
folders could not be searched; 2 nothing was predicted (bad options, no images, an --out with other results).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import TYPE_CHECKING

from vip2clip.cli import CLIError
from vip2clip.cli.common import (
    add_inference_arguments,
    add_model_arguments,
    add_mutual_arguments,
    add_onnx_arguments,
    add_progress_argument,
    add_reference_arguments,
    add_threshold_arguments,
    add_tiling_arguments,
    holding_out_folder,
    predictor_spec_from_args,
    run_context,
)
from vip2clip.cli.explain import add_explain_argument, check_explain, explain_predictions

if TYPE_CHECKING:
    from vip2clip.inference.predictor import Predictor

logger = logging.getLogger(__name__)

_LISTED_FAILURES = 20  # unreadable files printed in the summary; all of them are in predictions.json
PREDICT_EPILOG = (
    "exit codes: 0 every image was judged; 1 results written, but some images could not be judged (unreadable, "
    'or NaN/infinite model output: pred_label "error" rows) or some folders could not be searched; 2 error, '
    "nothing predicted. Folders are searched recursively; ground_truth/ folders and *_mask files are skipped as "
    "masks (counted in the output)."
)


def add_batch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict", help="score images or folders; write tables, masks and overlays", epilog=PREDICT_EPILOG
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    predict.add_argument(
        "--out", required=True, help="output folder (re-running with the same inputs and settings resumes)"
    )
    predict.add_argument(
        "--overwrite", action="store_true", help="start a new result set in --out (earlier results there are removed)"
    )
    predict.add_argument("--no-overlays", dest="overlays", action="store_false", help="write masks only")
    predict.add_argument(
        "--panels", action="store_true", help="also write labelled panels (input | map | mask, score, decision)"
    )
    predict.add_argument(
        "--raw-maps", action="store_true", help="also write each anomaly map (original size, float16) to maps/*.npy"
    )
    add_explain_argument(predict, "explain/KEY.png for every judged image")
    add_progress_argument(predict)
    add_batch_argument(predict)
    add_model_arguments(predict, precision="auto")
    add_inference_arguments(predict)
    add_tiling_arguments(predict)
    add_reference_arguments(predict)
    add_mutual_arguments(predict, grouping=True)
    add_onnx_arguments(predict)
    add_threshold_arguments(predict)
    predict.set_defaults(func=run_predict)

    calibrate = subparsers.add_parser("calibrate", help="derive thresholds from defect-free images only")
    calibrate.add_argument("paths", nargs="+", metavar="GOOD_DIR", help="folders (or files) of normal images")
    calibrate.add_argument("--out", required=True, help="calibration JSON to write")
    calibrate.add_argument("--quantile", type=float, default=0.99, help="quantile of the image scores (0.99)")
    calibrate.add_argument("--pixel-quantile", type=float, default=0.999, help="quantile of the pixel scores (0.999)")
    add_progress_argument(calibrate)
    add_batch_argument(calibrate)
    add_model_arguments(calibrate, precision="auto")
    add_inference_arguments(calibrate)
    add_tiling_arguments(calibrate)
    add_reference_arguments(calibrate)
    add_mutual_arguments(calibrate, grouping=True)
    add_onnx_arguments(calibrate)
    calibrate.set_defaults(func=run_calibrate)


def build_predictor(args: argparse.Namespace, thresholds: bool = True) -> Predictor:
    """The Predictor of the parsed options (`Predictor.from_spec`): model (or the --onnx engine), tiling,
    references and (thresholds=True) the decision thresholds."""
    from vip2clip.inference.predictor import Predictor
    from vip2clip.onnx.engine import MissingDependencyError

    try:
        predictor = Predictor.from_spec(predictor_spec_from_args(args, decide=thresholds))
    except MissingDependencyError as error:
        raise CLIError(str(error)) from error
    if thresholds:
        decisions = predictor.thresholds
        logger.info("thresholds: image %.4g, pixel %.4g (%s)", decisions.image, decisions.pixel, decisions.source)
    return predictor


def _print_failures(failed: list[tuple[str, str]], what: str = "unreadable files") -> None:
    if not failed:
        return
    print(f"{what} ({len(failed)}):")
    for path, problem in failed[:_LISTED_FAILURES]:
        print(f"  {path}: {problem}")
    if len(failed) > _LISTED_FAILURES:
        print(f"  ... and {len(failed) - _LISTED_FAILURES} more (see predictions.json)")


def _print_groups(groups: list[dict]) -> None:
    """One line per mutual group, and a warning for groups whose images mostly do not look alike."""
    for group in groups:
        print(
            f"mutual group {group['group']}: {group['images']} images scored each other (each met "
            f"{group['others_per_image']}); {100 * group['alike_share']:.0f} % of them look alike"
        )
        if group["alike_share"] < 0.5:
            warning = f"warning: most images of {group['group']} do not look alike (mostly defective, or parts mixed?)"
            print(f"{warning}: their mutual scores are not to be trusted; see docs/mutual.md", file=sys.stderr)


@holding_out_folder("predict")
def run_predict(args: argparse.Namespace) -> int:
    from vip2clip.runs.folder_run import OutputOptions, predict_folder

    conflicting = {"--tile": args.tile, "--reference": args.reference, "--onnx": args.onnx, "--mutual": args.mutual}
    check_explain(args, conflicting)
    run = run_context(args)
    predictor = build_predictor(args)
    options = OutputOptions(args.overlays, args.panels, args.raw_maps)
    summary = predict_folder(
        predictor,
        args.paths,
        out_dir=args.out,
        overwrite=args.overwrite,
        options=options,
        run=run,
        mutual_group=args.mutual_group,
    )
    if not run.world.is_main:  # the same exit code on every rank
        return 0 if summary.complete else 1
    for note in summary.scan.notes():
        print(f"note: {note}")
    if summary.self_references:
        print(
            f"note: {summary.self_references} of the {summary.found} images are reference images too: each was "
            "compared with the other references only (an image is never its own reference)"
        )
    print(
        f"{summary.found} images found: {summary.predicted} predicted, {summary.skipped} already done, "
        f"{len(summary.failed)} unreadable, {len(summary.errors)} not judged (NaN/infinite model output)"
    )
    judged = summary.total_rows - len(summary.failed) - len(summary.errors)
    print(f"{summary.anomalous} of {judged} judged images are anomalous")
    _print_failures(summary.failed, 'files unreadable, or too small or thin to judge (pred_label "error")')
    _print_failures(summary.errors, 'images the model could not judge (pred_label "error")')
    _print_groups(summary.mutual_groups)
    folders = "masks/" + (", overlays/" if args.overlays else "") + (", panels/" if args.panels else "")
    folders += ", maps/" if args.raw_maps else ""
    print(f"results: {summary.out_dir / 'predictions.csv'} (+ predictions.json, {folders})")
    if args.explain:
        explain_predictions(args, predictor)
    if not summary.complete:
        print('exit code 1: some images were not judged; their rows say pred_label "error"', file=sys.stderr)
        return 1
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from vip2clip.runs.folder_calibrate import calibrate_folder

    predictor, run = build_predictor(args, thresholds=False), run_context(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always" if run.world.is_main else "ignore", UserWarning)
        calibration, failed, scan = calibrate_folder(
            predictor,
            args.paths,
            image_quantile=args.quantile,
            pixel_quantile=args.pixel_quantile,
            run=run,
            mutual_group=args.mutual_group,
        )
    if not run.world.is_main:
        return 0
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    path = calibration.save(args.out)
    for note in scan.notes():
        print(f"note: {note}")
    _print_failures(failed, "files unreadable, or too small or thin to judge (skipped)")
    print(
        f"calibrated on {calibration.n_images} normal images: image threshold {calibration.image_threshold:.6g} "
        f"(quantile {args.quantile}), pixel threshold {calibration.pixel_threshold:.6g} "
        f"(quantile {args.pixel_quantile})"
    )
    print(f"written: {path}")
    return 0
