"""`vip2clip info`: the resolved configuration, trainable parameter count and where the weights came from."""

from __future__ import annotations

import argparse
import json

from vip2clip.cli.common import add_model_arguments, build_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="show the model configuration and its trainable parameters")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
