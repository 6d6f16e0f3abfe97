"""Options shared by the commands, each defined once: model and weights, model hyper-parameters, inference
options, tiling, reference images, decision thresholds, progress bars; their mapping to the specs of
`vip2clip.inference.assembly` (the one path from options to a model or predictor) and the progress reporter."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vip2clip.cli import CLIError
from vip2clip.config import DEFAULT_BACKBONE
from vip2clip.utils.distributed import LOCAL, World
from vip2clip.utils.run_context import RunContext

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vip2clip.inference.assembly import ModelSpec, PredictorSpec
    from vip2clip.model.identity import ModelIdentity
    from vip2clip.model.vip2clip import ViP2CLIP
    from vip2clip.scoring.mutual_rule import MutualRule
    from vip2clip.scoring.tiling import TileConfig
    from vip2clip.utils.progress import Progress


# What --precision auto picks, for --help (measured: docs/precision.md).
PRECISION_HELP = (
    "the frozen encoders' precision (default {default}). auto: bf16 where the CPU computes it natively (AVX512-BF16 "
    "or AMX: 2-4x faster than fp32) or the GPU supports it, fp32 elsewhere (emulated bf16 is slower than fp32); "
    "`vip2clip info` shows the choice. fp32 is the reference the paper's tables are computed in"
)


def add_model_arguments(parser: argparse.ArgumentParser, *, checkpoint: bool = True, precision: str = "fp32") -> None:
    """--backbone, --clip-weights, --random-init, --allow-other-clip-weights, --checkpoint, --image-size, --device,
    --precision (its default: `precision`, "auto" for the commands that deploy, "fp32" for the ones that measure),
    --compile."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        default=None,
        help="a preset of `vip2clip models` or an open_clip ViT name (default: the checkpoint's backbone; "
        f"{DEFAULT_BACKBONE} without a checkpoint)",
    )
    group.add_argument(
        "--clip-weights",
        default=None,
        help="CLIP weights: a local OpenAI-format file (state dict or TorchScript .pt), a downloaded published tag "
        "(openai-vit-l-14-336: `vip2clip download`) or an open_clip tag (openai)",
    )
    group.add_argument(
        "--random-init",
        action="store_true",
        help="random CLIP weights on purpose (tests, timing only: scores mean nothing); without it, --clip-weights is "
        "required (the tiny test backbone excepted)",
    )
    if checkpoint:
        group.add_argument(
            "--checkpoint",
            default=None,
            help="vip2clip or authors' release checkpoint file, or a downloaded published tag (release-mvtec, "
            "release-visa: `vip2clip download`)",
        )
        group.add_argument(
            "--allow-other-clip-weights",
            dest="allow_other_weights",
            action="store_true",
            help="run a checkpoint on CLIP weights other than those it was trained with (refused otherwise: the "
            "checkpoint records their fingerprint)",
        )
    group.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side in pixels (default: the size the checkpoint was trained at; without one 518, 128 for the tiny "
        "backbone)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    group.add_argument(
        "--precision",
        default=precision,
        choices=["auto", "fp32", "fp16", "bf16"],
        help=PRECISION_HELP.format(default=precision),
    )
    group.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder blocks (pays off on a GPU; slow start)"
    )


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """--onnx: an exported model instead of --checkpoint/--clip-weights (predict, calibrate, serve)."""
    group = parser.add_argument_group("ONNX engine (instead of the model options above)")
    group.add_argument(
        "--onnx", default=None, metavar="MODEL.onnx", help="a model written by `vip2clip export` (no torch needed)"
    )
    group.add_argument(
        "--onnx-backend",
        default="auto",
        choices=["auto", "onnxruntime", "openvino"],
        help="runtime for --onnx (auto: the faster one for the precision that is installed; both read the file)",
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Model hyper-parameters and the paper's ablation switches (recorded in every checkpoint)."""
    group = parser.add_argument_group("ViP²-CLIP options (defaults: the paper's)")
    group.add_argument("--no-vca", dest="use_vca", action="store_false", default=None, help="static prompts only")
    group.add_argument("--no-fgp", dest="use_fgp", action="store_false", default=None, help="no fine-grained attention")
    group.add_argument(
        "--no-utpa", dest="use_utpa", action="store_false", default=None, help="dual-branch image score (Table 5)"
    )
    group.add_argument("--state-words", nargs=2, metavar=("NORMAL", "ANOMALOUS"), default=None)
    group.add_argument("--n-context", type=int, default=None, help="static context tokens per prompt (7)")
    group.add_argument("--n-dynamic", type=int, default=None, help="visual-conditioned generic tokens (3)")
    group.add_argument("--top-k", type=int, default=None, help="patches pooled for the image score (50)")
    group.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the maps (8)")
    group.add_argument("--feature-layers", type=int, nargs="+", default=None, help="1-based blocks (6 12 18 24)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that change scores without retraining (recorded in calibration files and checked)."""
    group = parser.add_argument_group("inference options (default: the checkpoint's)")
    group.add_argument("--top-k", type=int, default=None, help="patches pooled for the image score")
    group.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the maps")


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """--tile / --tile-overlap: large images scored tile by tile (predict, calibrate, serve, test)."""
    group = parser.add_argument_group("tiling (large images; docs/tiling.md)")
    group.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="SIZE",
        help="score SIZE x SIZE tiles (pixels of the original image) and stitch their maps (default: whole image)",
    )
    group.add_argument(
        "--tile-overlap",
        type=float,
        default=None,
        metavar="FRACTION",
        help="share of a tile its neighbours overlap, with --tile (default 0.25)",
    )


def tiling_from_args(args: argparse.Namespace) -> TileConfig | None:
    """The TileConfig of --tile / --tile-overlap (None without --tile); CLIError for bad values."""
    from vip2clip.scoring.tiling import DEFAULT_OVERLAP, TileConfig

    if args.tile is None:
        if args.tile_overlap is not None:
            raise CLIError("--tile-overlap needs --tile SIZE (without --tile the whole image is scored at once)")
        return None
    try:
        return TileConfig(args.tile, DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap)
    except ValueError as error:
        raise CLIError(f"--tile / --tile-overlap: {error}") from None


def add_reference_arguments(parser: argparse.ArgumentParser, *, shots: bool = False, seed: bool = False) -> None:
    """Reference images: --reference DIR (predict, calibrate, serve) or --shots K [--seed] (test, benchmark)."""
    group = parser.add_argument_group("reference images (few-shot; docs/few-shot.md)")
    if shots:
        group.add_argument(
            "--shots",
            type=int,
            default=0,
            metavar="K",
            help="K normal train images per class as references (the few-shot protocol; 0: zero-shot)",
        )
        if seed:
            group.add_argument("--seed", type=int, default=111, help="seed choosing the --shots images (111)")
    else:
        group.add_argument("--reference", default=None, metavar="DIR", help="folder of normal images of this part")
    group.add_argument(
        "--reference-cache",
        default=None,
        metavar="DIR",
        help="where reference memories are cached (default ~/.cache/vip2clip/references)",
    )


def reference_cache_from_args(args: argparse.Namespace) -> str:
    from vip2clip.scoring.references import default_cache_dir

    return args.reference_cache or str(default_cache_dir())


def add_mutual_arguments(parser: argparse.ArgumentParser, grouping: bool = False) -> None:
    """--mutual and its rule (predict, calibrate, test); --mutual-group (predict, calibrate)."""
    from vip2clip.scoring.mutual_rule import DEFAULT_GROUP, GROUPS, MutualRule

    default = MutualRule()
    group = parser.add_argument_group("batch zero-shot: images of a part score each other (docs/mutual.md)")
    what = "the images of each group" if grouping else "each class's test images"
    group.add_argument("--mutual", action="store_true", help=f"{what} score each other, fused with the model's maps")
    if grouping:
        group.add_argument(
            "--mutual-group",
            choices=GROUPS,
            default=DEFAULT_GROUP,
            help="which images score each other: all the images the run is given (all, the default), or those of "
            "each folder apart (folder: one part or camera view per folder)",
        )
    group.add_argument(
        "--mutual-others",
        type=int,
        default=default.max_others,
        metavar="M",
        help=f"at most M other images per image (a seeded sample beyond; {default.max_others})",
    )
    group.add_argument(
        "--mutual-share",
        type=float,
        default=default.share,
        metavar="F",
        help=f"average the smallest share F of the distances to the other images ({default.share})",
    )
    group.add_argument(
        "--mutual-weight",
        type=float,
        default=default.weight,
        metavar="W",
        help=f"share of the mutual map in the fused map ({default.weight}; 1: mutual only)",
    )
    group.add_argument("--mutual-seed", type=int, default=default.seed, help="seed of the sample of others (0)")


def mutual_from_args(args: argparse.Namespace) -> MutualRule | None:
    """The MutualRule of --mutual and its options (None without --mutual); CLIError for bad values."""
    if not getattr(args, "mutual", False):
        return None
    from vip2clip.scoring.mutual_rule import MutualRule

    try:
        return MutualRule(
            share=args.mutual_share, max_others=args.mutual_others, weight=args.mutual_weight, seed=args.mutual_seed
        )
    except ValueError as error:
        raise CLIError(f"--mutual: {error}") from None


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decisions")
    group.add_argument("--calibration", default=None, help="calibration JSON from `vip2clip calibrate` or `test`")
    group.add_argument("--threshold", type=float, default=None, help="image threshold (overrides the calibration)")
    group.add_argument(
        "--pixel-threshold", type=float, default=None, help="pixel threshold for masks (overrides the calibration)"
    )


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def world_of(args: argparse.Namespace) -> World:
    """The process's `World` (set by `vip2clip.cli.main`; one process when the command is called directly)."""
    return getattr(args, "world", LOCAL)


def holding_out_folder(command: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable]:
    """Decorator of a command's run(args): one run at a time in args.out (`utils.folder_lock`; rank 0 holds it for
    its torchrun job); a second run into the same --out is refused (exit 2) naming the folder and the first's pid."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(run)
        def locked(args: argparse.Namespace) -> int:
            from vip2clip.utils.folder_lock import exclusive_folder

            if not getattr(args, "out", None):
                return run(args)
            with exclusive_folder(args.out, f"vip2clip {command}", take=world_of(args).is_main):
                return run(args)

        return locked

    return decorate


def progress_for(args: argparse.Namespace) -> Progress:
    """tqdm bars on stderr when it is a terminal and --no-progress was not given (rank 0 only); silence otherwise."""
    from vip2clip.utils.progress import silent

    if not getattr(args, "progress", True) or not sys.stderr.isatty() or not world_of(args).is_main:
        return silent
    from tqdm import tqdm

    def bars(items, *, total=None, desc=""):
        return tqdm(items, total=total, desc=desc, leave=False)

    return bars


def run_context(args: argparse.Namespace) -> RunContext:
    """The `run=` of the library calls a command makes: its progress bars (`progress_for`) and its process group
    (`world_of`), built once per command."""
    return RunContext(progress=progress_for(args), world=world_of(args))


def model_spec_from_args(args: argparse.Namespace, **fixed: Any) -> ModelSpec:
    """The ModelSpec of the parsed model options (`fixed`: fields the command sets itself, e.g. the seed). The
    ModelConfig overrides are the options named like its fields that the user gave (unset ones keep the
    checkpoint's or the paper's values); --onnx options where the command has them."""
    from vip2clip.inference.assembly import CONFIG_OVERRIDES, ModelSpec

    config = {name: getattr(args, name) for name in CONFIG_OVERRIDES if getattr(args, name, None) is not None}
    values = {name: getattr(args, name) for name in _SPEC_OPTIONS if hasattr(args, name)}
    try:
        return ModelSpec(**values, config=config, **fixed)
    except ValueError as error:
        raise CLIError(str(error)) from None


# ModelSpec fields that are command-line options of the same name (--checkpoint, --clip-weights, ...).
_SPEC_OPTIONS = (
    "checkpoint",
    "clip_weights",
    "random_init",
    "backbone",
    "image_size",
    "device",
    "precision",
    "compile",
    "onnx",
    "onnx_backend",
    "allow_other_weights",  # --allow-other-clip-weights
)


def build_model(args: argparse.Namespace, **fixed: Any) -> tuple[ViP2CLIP, ModelIdentity]:
    """The model of the parsed options and its identity (`vip2clip.inference.assembly.build_model`)."""
    from vip2clip.inference.assembly import build_model as build

    return build(model_spec_from_args(args, **fixed))


def predictor_spec_from_args(args: argparse.Namespace, decide: bool = True) -> PredictorSpec:
    """The PredictorSpec of the parsed options: model (or --onnx), tiling, references, thresholds, batch size,
    mutual scoring."""
    from vip2clip.inference.assembly import PredictorSpec

    spec = model_spec_from_args(args)
    fixed = spec.fixed_by_export()
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise CLIError(
            f"--onnx runs the exported model as it is: {flags} cannot be used with it (they are fixed "
            "when exporting: `vip2clip export ... --out MODEL.onnx`)"
        )
    if spec.onnx is not None and getattr(args, "reference_cache", None):
        raise CLIError(
            "--reference-cache cannot be used with --onnx: reference images need the encoder's patch tokens, which "
            "an ONNX export does not give (use --checkpoint for --reference)"
        )
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if spec.onnx is not None and getattr(args, "mutual", False):
        raise CLIError(
            "--mutual needs the encoder's patch tokens, which the exported ONNX graph does not output (it gives "
            "scores and maps only); use the PyTorch model (--checkpoint) for mutual scoring"
        )
    explicit = getattr(args, "threshold", None) is not None and getattr(args, "pixel_threshold", None) is not None
    if decide and getattr(args, "mutual", False) and not (getattr(args, "calibration", None) or explicit):
        from vip2clip.inference.thresholds import MUTUAL_UNCALIBRATED  # also refused by the library, after loading

        raise CLIError(MUTUAL_UNCALIBRATED)
    return PredictorSpec(
        model=spec,
        tiling=tiling_from_args(args),
        reference=args.reference,
        reference_cache=args.reference_cache,  # None: the default folder, found without importing torch
        calibration=getattr(args, "calibration", None),
        image_threshold=getattr(args, "threshold", None),
        pixel_threshold=getattr(args, "pixel_threshold", None),
        decide=decide,
        batch_size=args.batch_size,
        mutual=mutual_from_args(args),
    )
