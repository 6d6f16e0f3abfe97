"""`vip2clip serve` (the prediction API and browser page) and `vip2clip demo` (the offline end-to-end run)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

from vip2clip.cli import CLIError
from vip2clip.cli.common import (
    add_inference_arguments,
    add_model_arguments,
    add_onnx_arguments,
    add_reference_arguments,
    add_threshold_arguments,
    add_tiling_arguments,
)
from vip2clip.cli.predict import add_batch_argument, build_predictor

# The server's packages (the `serve` extra): import name -> distribution name.
SERVE_PACKAGES = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "python_multipart": "python-multipart",
    "fastapi_offline": "fastapi-offline",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="prediction API (POST /api/predict) and browser page: upload an image, see score and mask"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=7860, help="port (7860; 0 picks a free one)")
    limits = serve.add_argument_group("limits")
    limits.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted request body (10 MB)")
    limits.add_argument("--max-megapixels", type=float, default=40.0, help="largest accepted image (40 MP)")
    limits.add_argument(
        "--max-queue",
        type=int,
        default=8,
        help="requests admitted at once, uploading, waiting or running (8); more get HTTP 503 with Retry-After",
    )
    limits.add_argument("--body-timeout", type=float, default=60.0, help="seconds an upload may take to arrive (60)")
    add_model_arguments(serve, precision="auto")
    add_inference_arguments(serve)
    add_tiling_arguments(serve)
    add_reference_arguments(serve)
    add_onnx_arguments(serve)
    add_threshold_arguments(serve)
    add_batch_argument(serve)
    serve.set_defaults(func=run_serve)

    demo = subparsers.add_parser(
        "demo", help="offline end-to-end demo: synthetic data, train, zero-shot test, table and heat maps"
    )
    demo.add_argument("--out", default="vip2clip_demo", help="output folder (./vip2clip_demo)")
    demo.add_argument("--backbone", default="tiny", help="'tiny' (random, offline) or e.g. ViT-L-14-336")
    demo.add_argument("--clip-weights", default=None, help="CLIP weights file for a real backbone")
    demo.add_argument("--image-size", type=int, default=None, help="model input size (tiny: 128, real: 518)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (demo default)")
    demo.add_argument("--device", default="cpu", help="where the demo trains and predicts: cpu, cuda, cuda:1 (cpu)")
    demo.set_defaults(func=run_demo)


def _check_serve_arguments(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535 (0 picks a free port), got {args.port}")
    for flag, value in (
        ("--max-upload-mb", args.max_upload_mb),
        ("--max-megapixels", args.max_megapixels),
        ("--body-timeout", args.body_timeout),
    ):
        if not value > 0:  # also refuses NaN
            raise CLIError(f"{flag} must be > 0, got {value}")
    if args.max_queue < 1:
        raise CLIError(f"--max-queue must be >= 1, got {args.max_queue}")
    missing = [dist for module, dist in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise CLIError(
            f"vip2clip serve needs {', '.join(missing)}, which is not installed: pip install 'vip2clip[serve]' "
            f"(or pip install {' '.join(missing)})"
        )


def run_serve(args: argparse.Namespace) -> int:
    _check_serve_arguments(args)
    from vip2clip.apps.serve import listen, serve
    from vip2clip.apps.serve_jobs import ServeLimits

    limits = ServeLimits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000),
        max_queue=args.max_queue,
        body_timeout=args.body_timeout,
    )
    sock = listen(args.host, args.port)  # before the model loads: a taken port is reported at once
    try:
        predictor = build_predictor(args)
    except BaseException:
        sock.close()
        raise
    try:
        serve(predictor, sock, limits=limits)
    except KeyboardInterrupt:  # Ctrl+C, once uvicorn has closed the connections
        # Nothing is left to save, and the interpreter's teardown of torch and the model took 3-8 s: leave now.
        print("vip2clip serve: stopped", file=sys.stderr, flush=True)
        logging.shutdown()  # flushes the log handlers
        sys.stdout.flush()
        os._exit(130)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from vip2clip.apps.demo import DemoConfig, run_offline_demo

    overrides = {"image_size": args.image_size, "epochs": args.epochs}
    config = DemoConfig(**{key: value for key, value in overrides.items() if value is not None})
    run_offline_demo(
        args.out, backbone=args.backbone, clip_weights=args.clip_weights, device=args.device, config=config
    )
    return 0
