"""`vip2clip demo`: the whole zero-shot protocol on a small synthetic benchmark, offline, in a few minutes.

Two synthetic "datasets" in MVTec layout are generated (textured surfaces and structured objects, different seeds
and palettes); the model is trained on the first (its test split, as the release trains on MVTec AD's) and
evaluated zero-shot on the second. Output in OUT/: results.{md,csv,json}, calibration.json, a few heat-map panels
in maps/, the data in data/ and the training run in train/.

Offline the backbone is the tiny *randomly initialised* CLIP: the numbers show that the pipeline runs end to end
and that the trainable parts learn something transferable on easy synthetic defects, nothing about what CLIP or
ViP²-CLIP can do. Two settings differ from the release, for the demo only, and the output says so: the FGP
learning rate is raised from 1e-5 to 1e-3 (at 1e-5 the attention barely moves in a few epochs), and top-K is
scaled to the patch grid (the release pools 50 of 37x37 = 1369 patches; at 128 px the tiny model has 8x8 = 64, and
pooling 50 of them averages away the defect).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vip2clip.config import TINY_BACKBONE, ModelConfig
from vip2clip.data.index import DatasetIndex
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.evaluation.benchmark import CALIBRATION_NAME, MAPS_DIR, evaluate_dataset
from vip2clip.evaluation.reports import class_table_markdown
from vip2clip.evaluation.results import EvalConfig, EvaluationResult
from vip2clip.factory import create_model
from vip2clip.model.identity import ModelIdentity
from vip2clip.training.loop import TrainConfig, TrainResult, train
from vip2clip.utils.fileio import atomic_write_json

logger = logging.getLogger(__name__)

MARKER = "demo.json"
RELEASE_LR_FGP = TrainConfig().lr_fgp
RELEASE_TOP_K, RELEASE_PATCHES = ModelConfig().top_k, 37 * 37


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Demo settings. image_size None: 128 for the tiny backbone, the model's default (518) otherwise."""

    image_size: int | None = None
    data_size: int = 128  # side of the generated images
    classes: int = 2
    train_good: int = 8
    train_defect: int = 12
    test_good: int = 6
    test_defect: int = 6
    epochs: int = 5
    batch_size: int = 8
    lr_fgp: float = 1e-3
    seed: int = 111
    panels_per_class: int = 3

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


@dataclass(kw_only=True)
class DemoResult:
    out_dir: Path
    result: EvaluationResult
    checkpoint: Path
    panels: list[Path]
    seconds: float
    notes: list[str] = field(default_factory=list)


def scaled_top_k(image_size: int, patch_size: int) -> int:
    """top-K covering the same share of the patch grid as the release's 50 of 1369 patches (at least 1)."""
    patches = (image_size // patch_size) ** 2
    return max(1, round(RELEASE_TOP_K * patches / RELEASE_PATCHES))


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to write into an unrelated non-empty folder; a previous demo folder is reused (its run replaced)."""
    if out_dir.is_file():
        raise ValueError(f"{out_dir}: is a file, expected a folder for the demo")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).is_file():
            raise ValueError(f"{out_dir}: folder is not empty and is not a vip2clip demo folder; choose another --out")
        shutil.rmtree(out_dir / "train", ignore_errors=True)  # our own previous run: start training afresh
        shutil.rmtree(out_dir / MAPS_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_marker(out_dir: Path, data: dict[str, Any]) -> None:
    """demo.json: status "running", "done", "failed" or "interrupted" (with the error), settings, results."""
    atomic_write_json(out_dir / MARKER, data)


TINY_BANNER = (
    "This demo runs on a TINY, RANDOMLY INITIALISED CLIP (no pretrained weights offline). Its numbers only show that "
    "the pipeline works end to end; they say NOTHING about what CLIP or ViP²-CLIP can do. For the real model: "
    "vip2clip demo --backbone ViT-L-14-336 --clip-weights ViT-L-14-336px.pt"
)


def _notes(config: DemoConfig, top_k: int) -> list[str]:
    """How this run differs from the release (also written into results.md and results.json)."""
    notes = []
    if config.lr_fgp != RELEASE_LR_FGP:
        notes.append(
            f"FGP learning rate raised from the release's {RELEASE_LR_FGP:g} to {config.lr_fgp:g} for this "
            "few-minute demo only (train/test keep the release's value)."
        )
    if top_k != RELEASE_TOP_K:
        notes.append(
            f"top-K = {top_k} instead of {RELEASE_TOP_K}: the same share of this small patch grid as the release's "
            f"{RELEASE_TOP_K} of {RELEASE_PATCHES} patches."
        )
    notes.append("The data are synthetic (seeded, generated here): trained on 'textured', tested on 'structured'.")
    return notes


def _generate_data(data_dir: Path, config: DemoConfig) -> tuple[DatasetIndex, DatasetIndex]:
    """The training set (textured surfaces) and the zero-shot test set (structured objects, other seed)."""
    common = {"classes": config.classes, "image_size": config.data_size, "n_train_good": 0}
    train_index = generate_benchmark(
        data_dir / "train_textured",
        seed=config.seed,
        style="textured",
        n_test_good=config.train_good,
        n_test_defect=config.train_defect,
        **common,
    )
    test_index = generate_benchmark(
        data_dir / "test_structured",
        seed=config.seed + 1,
        style="structured",
        n_test_good=config.test_good,
        n_test_defect=config.test_defect,
        **common,
    )
    return train_index, test_index


def _print_summary(
    echo: Callable[[str], None],
    out_dir: Path,
    *,
    result: EvaluationResult,
    checkpoint: Path,
    n_panels: int,
    seconds: float,
    backbone: str,
) -> None:
    echo("")
    echo(class_table_markdown(result, "ViP²-CLIP demo: trained on 'textured', tested zero-shot on 'structured'"))
    echo(f"table:       {out_dir / 'results.md'}  (full precision: results.csv, results.json)")
    if (out_dir / CALIBRATION_NAME).is_file():
        echo(f"thresholds:  {out_dir / CALIBRATION_NAME}")
    echo(f"heat maps:   {out_dir / MAPS_DIR} ({n_panels} panels: input | heat map | ground truth)")
    echo(f"checkpoint:  {checkpoint}")
    echo(f"finished in {seconds:.0f} s")
    if backbone == TINY_BACKBONE:
        echo("REMINDER: tiny random backbone; these numbers say nothing about CLIP's real ability.")


def _run_stages(
    out_dir: Path,
    *,
    backbone: str,
    clip_weights: str | Path | None,
    device: str,
    config: DemoConfig,
    echo: Callable[[str], None],
) -> tuple[EvaluationResult, TrainResult, int, list[str]]:
    """Build the model, generate the data, train, evaluate: (result, training, top_k, notes)."""
    image_size = config.image_size or (128 if backbone == TINY_BACKBONE else None)
    model = create_model(backbone, clip_weights=clip_weights, image_size=image_size, device=device, seed=config.seed)
    # Set after building: the share depends on the backbone's patch size. Only the scoring reads top_k.
    top_k = scaled_top_k(model.config.image_size, model.backbone.patch_size)
    model.config = model.config.updated(top_k=top_k)
    notes = _notes(config, top_k)
    for note in ([TINY_BANNER] if backbone == TINY_BACKBONE else []) + notes:
        echo(f"NOTE: {note}")

    echo("[1/3] generating two synthetic datasets ...")
    train_index, test_index = _generate_data(out_dir / "data", config)

    n_train = len(train_index.samples("test"))
    echo(f"[2/3] training on 'textured' ({n_train} images, {config.epochs} epochs, backbone {backbone}) ...")
    train_config = TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr_fgp=config.lr_fgp, seed=config.seed
    )
    trained = train(model, train_index, out_dir=out_dir / "train", config=train_config)

    echo("[3/3] zero-shot evaluation on 'structured' ...")
    eval_config = EvalConfig(max_panels=config.panels_per_class)
    result = evaluate_dataset(
        model,
        test_index,
        out_dir=out_dir,
        config=eval_config,
        name="synthetic 'structured' (zero-shot)",
        identity=ModelIdentity.of(model, trained.checkpoint),
        save_maps=True,
        notes=notes,
    )
    return result, trained, top_k, notes


def run_offline_demo(
    out_dir: str | Path = "vip2clip_demo",
    *,
    backbone: str = TINY_BACKBONE,
    clip_weights: str | Path | None = None,
    device: str = "cpu",
    config: DemoConfig | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Generate, train, evaluate zero-shot, write the table and panels; `echo` gets the progress lines.

    backbone "tiny" runs offline; any other backbone needs `clip_weights` (e.g. OpenAI's ViT-L-14-336px.pt).
    """
    config = config or DemoConfig()
    if backbone != TINY_BACKBONE and not clip_weights:
        raise ValueError(
            f"backbone {backbone} needs CLIP weights (--clip-weights FILE, e.g. OpenAI's ViT-L-14-336px.pt); "
            "without weights use the offline tiny backbone"
        )
    out_dir = Path(out_dir)
    started = time.perf_counter()
    _prepare_out_dir(out_dir)
    record = {"backbone": backbone, "config": asdict(config)}
    _write_marker(out_dir, {"status": "running", **record})
    try:
        result, trained, top_k, notes = _run_stages(
            out_dir, backbone=backbone, clip_weights=clip_weights, device=device, config=config, echo=echo
        )
    except BaseException as error:  # the marker must not say "running" for a run that stopped
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the demo
            _write_marker(out_dir, {"status": status, "error": f"{type(error).__name__}: {error}", **record})
        raise
    seconds = time.perf_counter() - started
    panels = sorted((out_dir / MAPS_DIR).rglob("*.png"))
    _write_marker(
        out_dir,
        {
            "status": "done",
            "seconds": round(seconds, 1),
            **record,
            "notes": notes,
            "top_k": top_k,
            "training": trained.history,
        },
    )

    _print_summary(
        echo,
        out_dir,
        result=result,
        checkpoint=trained.checkpoint,
        n_panels=len(panels),
        seconds=seconds,
        backbone=backbone,
    )
    return DemoResult(
        out_dir=out_dir, result=result, checkpoint=trained.checkpoint, panels=panels, seconds=seconds, notes=notes
    )
