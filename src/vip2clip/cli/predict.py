"""`vip2clip predict`, `vip2clip calibrate` and `vip2clip serve`: the practitioner's commands."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from vip2clip.cli import CLIError
from vip2clip.cli.common import add_model_arguments, build_model, config_from_args

logger = logging.getLogger(__name__)

_LISTED_FAILURES = 20  # unreadable files printed in the summary; all of them are in predictions.json


def _add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decisions")
    group.add_argument("--calibration", default=None, help="calibration JSON from `vip2clip calibrate` or `test`")
    group.add_argument("--threshold", type=float, default=None, help="image threshold (overrides the calibration)")
    group.add_argument(
        "--pixel-threshold", type=float, default=None, help="pixel threshold for masks (overrides the calibration)"
    )
    group.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that change scores without retraining; recorded in calibration files and checked."""
    group = parser.add_argument_group("inference options (default: the checkpoint's)")
    group.add_argument("--top-k", type=int, default=None, help="patches pooled for the image score")
    group.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the maps")


def _build(args: argparse.Namespace):
    return build_model(args, **config_from_args(args))


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser("predict", help="score images or folders; write tables, masks and overlays")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    predict.add_argument("--out", required=True, help="output folder (re-running with it resumes)")
    predict.add_argument("--overwrite", action="store_true", help="redo images already predicted in --out")
    predict.add_argument("--no-overlays", dest="overlays", action="store_false", help="write masks only")
    predict.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(predict)
    _add_inference_arguments(predict)
    _add_threshold_arguments(predict)
    predict.set_defaults(func=run_predict)

    calibrate = subparsers.add_parser("calibrate", help="derive thresholds from defect-free images only")
    calibrate.add_argument("paths", nargs="+", metavar="GOOD_DIR", help="folders (or files) of normal images")
    calibrate.add_argument("--out", required=True, help="calibration JSON to write")
    calibrate.add_argument("--quantile", type=float, default=0.99, help="quantile of the image scores (0.99)")
    calibrate.add_argument("--pixel-quantile", type=float, default=0.999, help="quantile of the pixel scores (0.999)")
    calibrate.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    calibrate.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_arguments(calibrate)
    _add_inference_arguments(calibrate)
    calibrate.set_defaults(func=run_calibrate)

    serve = subparsers.add_parser("serve", help="browser demo: upload an image, see score, overlay and mask")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=7860, help="port (7860; 0 picks a free one)")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (10 MB)")
    add_model_arguments(serve)
    _add_inference_arguments(serve)
    _add_threshold_arguments(serve)
    serve.set_defaults(func=run_serve)


def _predictor(args: argparse.Namespace):
    from vip2clip.predict import Predictor, resolve_thresholds

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = _build(args)
    thresholds = resolve_thresholds(model, args.checkpoint, args.calibration, args.threshold, args.pixel_threshold)
    logger.info("thresholds: image %.4g, pixel %.4g (%s)", thresholds.image, thresholds.pixel, thresholds.source)
    return Predictor(model, thresholds, args.batch_size)


def _print_failures(failed: list[tuple[str, str]]) -> None:
    if not failed:
        return
    print(f"unreadable files ({len(failed)}, skipped):")
    for path, problem in failed[:_LISTED_FAILURES]:
        print(f"  {path}: {problem}")
    if len(failed) > _LISTED_FAILURES:
        print(f"  ... and {len(failed) - _LISTED_FAILURES} more (see predictions.json)")


def run_predict(args: argparse.Namespace) -> int:
    from vip2clip.predict_files import predict_files

    predictor = _predictor(args)
    progress = args.progress and sys.stderr.isatty()
    summary = predict_files(
        predictor, args.paths, args.out, args.checkpoint, args.overwrite, args.overlays, progress=progress
    )
    print(
        f"{summary.found} images found: {summary.predicted} predicted, {summary.skipped} already done, "
        f"{len(summary.failed)} unreadable"
    )
    print(f"{summary.anomalous} of {summary.total_rows} predicted images are anomalous")
    _print_failures(summary.failed)
    print(f"results: {summary.out_dir / 'predictions.csv'} (+ predictions.json, masks/, overlays/)")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from vip2clip.predict import Predictor
    from vip2clip.predict_files import calibrate_files

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    predictor = Predictor(_build(args), batch_size=args.batch_size)
    progress = args.progress and sys.stderr.isatty()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        calibration, failed = calibrate_files(
            predictor, args.paths, args.checkpoint, args.quantile, args.pixel_quantile, progress
        )
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    path = calibration.save(args.out)
    _print_failures(failed)
    print(
        f"calibrated on {calibration.n_images} normal images: image threshold {calibration.image_threshold:.6g} "
        f"(quantile {args.quantile}), pixel threshold {calibration.pixel_threshold:.6g} "
        f"(quantile {args.pixel_quantile})"
    )
    print(f"written: {path}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from vip2clip.serve import serve

    if args.max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    serve(_predictor(args), args.host, args.port, int(args.max_upload_mb * 1024 * 1024))
    return 0
