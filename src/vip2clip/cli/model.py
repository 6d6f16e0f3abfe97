"""`vip2clip info` and `vip2clip convert-checkpoint`: the model's configuration and its checkpoint files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.cli.common import add_model_arguments, build_model


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="show the model configuration and its trainable parameters")
    add_model_arguments(info)
    info.set_defaults(func=run_info)

    convert = subparsers.add_parser(
        "convert-checkpoint", help="convert a checkpoint between our format and the authors' release format"
    )
    convert.add_argument("source", help="checkpoint to read (either format)")
    convert.add_argument("destination", help="file to write")
    convert.add_argument("--to", required=True, choices=["release", "vip2clip"], help="format to write")
    convert.set_defaults(func=run_convert)


def run_info(args: argparse.Namespace) -> int:
    model = build_model(args)
    backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    print(f"backbone: {model.config.backbone} ({model.backbone.depth} blocks, patch {model.backbone.patch_size})")
    print(f"backbone weights: {model.backbone.weights_source}")
    print(f"checkpoint: {args.checkpoint or 'none (untrained prompts)'}")
    print("config: " + json.dumps(model.config.to_dict(), sort_keys=True))
    print(f"trainable parameters: {model.num_trainable_parameters():,}")
    print(f"frozen backbone parameters: {sum(p.numel() for p in model.backbone.parameters()):,}")
    print(f"backbone parameters requiring grad: {backbone_trainable}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from vip2clip.model.checkpoint import convert_checkpoint

    if Path(args.source).resolve() == Path(args.destination).resolve():
        raise CLIError("source and destination are the same file; write the converted checkpoint elsewhere")
    written = convert_checkpoint(args.source, args.destination, to=args.to)
    print(f"wrote {written} ({args.to} format)")
    return 0
