"""`vip2clip study efficiency` (Table 3): our cost beside the paper's and, with --release-dir, the release's."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vip2clip.cli import CLIError
from vip2clip.cli.common import build_model, world_of

RELEASE_WIDTH = 768  # the release's Meta-Net and FGP are built for ViT-L/14's joint embedding


def add_efficiency_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("study efficiency (Table 3)")
    group.add_argument("--repetitions", type=int, default=20, help="timed images per computation (20)")
    group.add_argument("--warmup", type=int, default=3, help="untimed images first (3)")
    group.add_argument(
        "--release-dir",
        type=Path,
        default=None,
        metavar="CLONE",
        help="your clone of github.com/kim0806/ViP2-CLIP: its computation is measured beside ours (not vendored)",
    )


def _release_factory(args: argparse.Namespace, model, folder: Path):
    """A factory of the release's computation on the same CLIP weights as ours (the --clip-weights file, else our
    backbone's weights written to `folder` in OpenAI's layout), same image size, layers and heads' settings."""
    import torch

    from vip2clip.paper.release_clone import ReleaseComputation

    width = model.backbone.clip.text_projection.shape[1]
    if width != RELEASE_WIDTH:
        raise CLIError(
            f"--release-dir: the release's prompt learner is built for CLIP's {RELEASE_WIDTH}-d embedding (ViT-L/14), "
            f"this backbone ({model.backbone.name}) has {width}: use --backbone ViT-L-14-336"
        )
    weights = args.clip_weights
    if weights is None or not Path(weights).is_file():  # random, or an open_clip tag: the weights we loaded
        weights = folder / "clip_weights.pt"
        torch.save({key: value.float() for key, value in model.backbone.clip.state_dict().items()}, weights)
    config = model.config
    settings = {"n_ctx": config.n_context, "n_dynamic": config.n_dynamic, "top_k": config.top_k, "sigma": config.sigma}
    device = next(model.parameters()).device
    return lambda: ReleaseComputation(
        args.release_dir,
        Path(weights),
        device=device,
        image_size=config.image_size,
        layers=model.feature_layers,
        settings=settings,
    )


def _comparability(args: argparse.Namespace, model, device_name: str) -> str | None:
    """The shared label (`paper.comparability`) of what keeps our costs from comparing with the paper's;
    random weights do not (a cost does not depend on the weights' values), size and device do."""
    from vip2clip.paper.comparability import Comparability, compare_run
    from vip2clip.paper.efficiency import PAPER_IMAGE_SIZE

    run = compare_run({"backbone": model.backbone.name, "clip_weights": "any: costs do not depend on them"})
    reasons = list(run.reasons)
    if model.config.image_size != PAPER_IMAGE_SIZE:
        reasons.append(f"{model.config.image_size} px (the paper's {PAPER_IMAGE_SIZE})")
    if "L20" not in device_name:
        reasons.append(f"measured on {device_name}, the paper on an NVIDIA L20")
    return Comparability(tuple(reasons)).label()


def run_efficiency(args: argparse.Namespace) -> int:
    from vip2clip.evaluation.paper_numbers import load_paper_numbers
    from vip2clip.paper.efficiency import measure, write_efficiency
    from vip2clip.paper.release_clone import check_clone
    from vip2clip.utils.measure import machine_description

    if world_of(args).distributed:
        raise CLIError("study efficiency measures one process on one device: run it without torchrun")
    if args.repetitions < 1 or args.warmup < 0:
        raise CLIError(f"--repetitions must be >= 1 and --warmup >= 0, got {args.repetitions} and {args.warmup}")
    if args.release_dir is not None:
        try:
            check_clone(args.release_dir)
        except ValueError as error:
            raise CLIError(f"--release-dir {error}") from None
    model = build_model(args, seed=args.seed)[0].eval()
    machine = machine_description(args.device)
    device_name = machine.get("gpu", machine["cpu"])
    with tempfile.TemporaryDirectory(prefix="vip2clip-release-") as folder:
        release = _release_factory(args, model, Path(folder)) if args.release_dir is not None else None
        costs, memory = measure(
            model,
            device_name=device_name,
            batch_size=args.train_batch_size,
            repetitions=args.repetitions,
            warmup=args.warmup,
            release=release,
        )
    settings = {
        "comparability": _comparability(args, model, device_name),
        "image_size": model.config.image_size,
        "backbone": model.backbone.name,
        "precision": args.precision,
        "batch_size": args.train_batch_size,  # the training step's batch (the file's key is unchanged)
        "repetitions": args.repetitions,
        "warmup": args.warmup,
        "memory": memory.kind,
        "machine": machine,
        "release_dir": None if args.release_dir is None else str(args.release_dir),
    }
    note = (
        "The release column was not measured: pass --release-dir with a clone of the authors' repository."
        if release is None
        else "The release: its own CLIP, prompt learner (freshly initialised) and FGP from the clone, float32, on "
        "the same CLIP weights, image size and layers."
    )
    written = write_efficiency(
        args.out, costs, paper=load_paper_numbers("paper").efficiency, settings=settings, note=note
    )
    print(Path(written["markdown"]).read_text(encoding="utf-8"))
    print(f"efficiency: {written['markdown']} (+ .json)")
    return 0
