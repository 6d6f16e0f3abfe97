"""`vip2clip info`, `models`, `download`, `convert-checkpoint` and `export`: the model's configuration, the presets
and published weights, checkpoint files and the ONNX export."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.cli.common import add_inference_arguments, add_model_arguments, build_model
from vip2clip.utils.cpu_features import cpu_features


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="show the model configuration and its trainable parameters")
    add_model_arguments(info, precision="auto")
    info.set_defaults(func=run_info)

    convert = subparsers.add_parser(
        "convert-checkpoint", help="convert a checkpoint between our format and the authors' release format"
    )
    convert.add_argument("source", help="checkpoint to read (either format)")
    convert.add_argument("destination", help="file to write")
    convert.add_argument("--to", required=True, choices=["release", "vip2clip"], help="format to write")
    convert.set_defaults(func=run_convert_checkpoint)

    models = subparsers.add_parser("models", help="list the model presets and the published weights")
    models.set_defaults(func=run_models)

    download = subparsers.add_parser(
        "download", help="fetch published weights (a tag of `vip2clip models`) and check their hash"
    )
    download.add_argument("tag", help="published weights tag, e.g. release-mvtec, openai-vit-l-14-336")
    download.add_argument(
        "--from", dest="source_file", default=None, metavar="FILE", help="install a file fetched by hand (checked)"
    )
    download.add_argument("--url", default=None, help="fetch from this mirror instead (the hash is still checked)")
    download.set_defaults(func=run_download)

    export = subparsers.add_parser(
        "export", help="export the whole predict to ONNX (for `--onnx`: ONNX Runtime or OpenVINO, no torch)"
    )
    export.add_argument("--out", required=True, help="ONNX file to write (large weights go to OUT.data beside it)")
    export.add_argument(
        "--external-data",
        choices=["auto", "yes", "no"],
        default="auto",
        help="weights in OUT.data: auto = above 1 GiB (ViT-L/14 yes, ViT-B/16 no)",
    )
    int8 = export.add_argument_group("INT8 (post-training quantization of the image encoder's linear layers)")
    int8.add_argument("--int8", action="store_true", help="write an INT8 model (needs --calibration-images)")
    int8.add_argument(
        "--calibration-images", nargs="+", metavar="PATH", help="normal images (files or folders; 32 or more)"
    )
    int8.add_argument(
        "--int8-method",
        choices=["nncf", "onnxruntime"],
        default="nncf",
        help="the quantizer (default nncf): nncf (OpenVINO's NNCF, the int8 extra) or onnxruntime (ONNX Runtime's "
        "quantize_static, only the onnx extra); both read the weights from the side file (ViT-L/14 at 518 px in "
        "under 10 GB)",
    )
    int8.add_argument(
        "--max-map-drop",
        type=float,
        default=None,
        help="accuracy control: keep the blocks that move the map most in fp32 until the map's rank correlation "
        "with fp32 is at least 1 - this (e.g. 0.01); slower export",
    )
    add_model_arguments(export, precision="auto")
    add_inference_arguments(export)
    export.set_defaults(func=run_export)


def run_info(args: argparse.Namespace) -> int:
    model, _ = build_model(args)
    backbone_trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    print(f"backbone: {model.config.backbone} ({model.backbone.depth} blocks, patch {model.backbone.patch_size})")
    print(f"backbone weights: {model.backbone.weights_source}")
    print(f"checkpoint: {args.checkpoint or 'none (untrained prompts)'}")
    print("config: " + json.dumps(model.config.to_dict(), sort_keys=True))
    print(f"trainable parameters: {model.num_trainable_parameters():,}")
    print(f"frozen backbone parameters: {sum(p.numel() for p in model.backbone.parameters()):,}")
    print(f"backbone parameters requiring grad: {backbone_trainable}")
    print(f"precision: {model.precision} ({model.describe_precision()})")
    print(f"cpu: {cpu_features().describe()}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    from vip2clip.model.presets import get_preset, list_models
    from vip2clip.model.pretrained import get_pretrained, list_pretrained, weights_dir

    print("presets (create_model(NAME), --backbone NAME):")
    for name in list_models():
        preset = get_preset(name)
        paper = f" [{'; '.join(preset.paper)}]" if preset.paper else ""
        print(f"  {name:<26} {preset.description}{paper}")
    print(f"published weights (vip2clip download TAG; stored in {weights_dir()}):")
    for tag in list_pretrained():
        entry = get_pretrained(tag)
        state = "not downloaded"
        if entry.path.is_file():  # a file placed by hand is hash-checked before its first use
            state = "downloaded, hash verified" if entry.is_verified() else "present, not verified yet: checked on use"
        flag = "--clip-weights" if entry.kind == "clip" else "--checkpoint"
        print(f"  {tag:<26} {flag} {tag}  ({state}) {entry.description}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from vip2clip.model.pretrained import download_pretrained, get_pretrained

    entry = get_pretrained(args.tag)
    if args.source_file is None and not entry.path.is_file():
        print(f"fetching {args.url or entry.url} ...")
    path = download_pretrained(args.tag, source_file=args.source_file, url=args.url)
    flag = "--clip-weights" if entry.kind == "clip" else "--checkpoint"
    print(f"{args.tag}: {path} ({entry.expected_hash} verified)")
    print(f"use it: {flag} {args.tag}")
    return 0


def run_convert_checkpoint(args: argparse.Namespace) -> int:
    from vip2clip.model.checkpoint import convert_checkpoint

    if Path(args.source).resolve() == Path(args.destination).resolve():
        raise CLIError("source and destination are the same file; write the converted checkpoint elsewhere")
    written = convert_checkpoint(args.source, args.destination, to=args.to)
    print(f"wrote {written} ({args.to} format)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from vip2clip.onnx.engine import MissingDependencyError
    from vip2clip.onnx.export import export_onnx

    if args.precision not in ("auto", "fp32") or args.compile:
        raise CLIError(
            "export writes the fp32 graph (or INT8 with --int8): drop --precision/--compile; the runtime chooses "
            "the precision when the file runs (`--onnx MODEL.onnx`, auto: bf16 on CPUs with native bf16)"
        )
    args.precision = "fp32"  # the graph is traced in fp32 whatever runs it later
    if args.int8 != bool(args.calibration_images):
        raise CLIError("--int8 needs --calibration-images DIR (normal images), and --calibration-images needs --int8")
    if not getattr(args, "verbose", False):
        for name in ("onnxscript", "onnx_ir"):  # hundreds of INFO lines per export otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
    model, identity = build_model(args)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    try:
        path = export_onnx(
            model,
            args.out,
            checkpoint=identity.checkpoint,
            external_data=external,
            quantize="int8" if args.int8 else None,
            calibration_images=args.calibration_images,
            int8_method=args.int8_method,
            max_map_drop=args.max_map_drop,
            progress=print,
        )
    except MissingDependencyError as error:
        raise CLIError(str(error)) from error
    data = path.with_name(path.name + ".data")
    size = model.config.image_size
    kind = "INT8 " if args.int8 else ""
    print(f"wrote {kind}{path}" + (f" and its weights {data.name} (keep them side by side)" if data.exists() else ""))
    print(f"input images [B, 3, {size}, {size}] (normalised), outputs pred_score [B], anomaly_map [B, {size}, {size}]")
    print(f"use it: vip2clip predict IMAGES --onnx {path} --out preds/  (or vip2clip.load_onnx in Python)")
    return 0
