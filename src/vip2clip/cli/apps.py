"""`vip2clip serve` (the browser demo) and `vip2clip demo` (the offline end-to-end run)."""

from __future__ import annotations

import argparse

from vip2clip.cli import CLIError
from vip2clip.cli.common import add_inference_arguments, add_model_arguments, add_threshold_arguments
from vip2clip.cli.predict import add_batch_argument, build_predictor


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="browser demo: upload an image, see score, overlay and mask")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=7860, help="port (7860; 0 picks a free one)")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (10 MB)")
    add_model_arguments(serve)
    add_inference_arguments(serve)
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
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=run_demo)


def run_serve(args: argparse.Namespace) -> int:
    from vip2clip.apps.serve import serve

    if args.max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    serve(build_predictor(args), args.host, args.port, int(args.max_upload_mb * 1024 * 1024))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from vip2clip.apps.demo import DemoConfig
    from vip2clip.apps.demo import run_demo as demo

    overrides = {"image_size": args.image_size, "epochs": args.epochs}
    config = DemoConfig(**{key: value for key, value in overrides.items() if value is not None})
    demo(args.out, args.backbone, args.clip_weights, args.device, config)
    return 0
