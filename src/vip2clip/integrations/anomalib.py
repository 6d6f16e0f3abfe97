"""ViP²-CLIP as an anomalib 2.x model: `vip2clip.integrations.anomalib.ViP2CLIP` (`pip install "vip2clip[anomalib]"`).

>>> from anomalib.data import MVTecAD  # doctest: +SKIP
>>> from anomalib.engine import Engine  # doctest: +SKIP
>>> model = ViP2CLIP(checkpoint="run/checkpoint.pt", clip_weights="ViT-L-14-336px.pt")  # doctest: +SKIP
>>> Engine().test(model, datamodule=MVTecAD(root="mvtec", category="bottle"))  # doctest: +SKIP

The same computation as `vip2clip.Predictor` and `vip2clip test`: the model comes from the assembly path they
take (`vip2clip.inference.assembly.build_model`, which calls `vip2clip.create_model`), anomalib's PreProcessor
resizes and normalises as the release does and its PostProcessor thresholds the probabilities
(`vip2clip.integrations.anomalib_processing`). Zero-shot by default (anomalib's zero-shot learning
type); few-shot with anomalib's WinCLIP's parameters: `k_shot=k` makes k normal images of the data module's train
split, drawn as `vip2clip test --shots k --seed s` draws them, the reference memory
(`vip2clip.scoring.references`); `few_shot_source=FOLDER` takes them from a folder of normal images instead (k of
them, or all of them with k_shot=0). The old names `shots` and `reference` still work, with a FutureWarning.

Training is refused: the release trains the prompts on an auxiliary dataset's *test* split (anomalous images with
masks), which anomalib's loop, whose train split holds normal images and which never calls a zero-shot model's
training step, cannot express; `vip2clip train` does it (the message gives the command). `engine.fit` on this model
does what it does on every anomalib zero-/few-shot model: it runs validation to collect thresholds, and a
warning says that nothing is trained and gives the command.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from vip2clip.integrations.anomalib_support import require_anomalib

require_anomalib()

import torch  # noqa: E402
from anomalib import LearningType  # noqa: E402
from anomalib.data import Batch, InferenceBatch  # noqa: E402
from anomalib.metrics import Evaluator  # noqa: E402
from anomalib.models.components import AnomalibModule  # noqa: E402
from anomalib.visualization import Visualizer  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.transforms.v2 import Resize  # noqa: E402

from vip2clip.data.images import load_image  # noqa: E402
from vip2clip.evaluation.class_scoring import draw_shots  # noqa: E402
from vip2clip.inference.assembly import ModelSpec, build_model  # noqa: E402
from vip2clip.integrations.anomalib_processing import (  # noqa: E402
    ProbabilityPostProcessor,
    ReleasePreProcessor,
    is_tracing,
)
from vip2clip.model.vip2clip import ViP2CLIP as ViP2CLIPNetwork  # noqa: E402
from vip2clip.scoring.references import (  # noqa: E402
    ReferenceEngine,
    ReferenceMemory,
    default_cache_dir,
    memory_from_files,
    reference_files,
)

__all__ = ["ViP2CLIP"]

logger = logging.getLogger(__name__)

EXPORT_OPSET = 18  # the ONNX opset torch's dynamo exporter writes (`vip2clip export` writes it too)

TRAINING_REFUSED = (
    "ViP2CLIP is not trained through anomalib's loop: the release trains its prompts on an auxiliary dataset's test "
    "split (anomalous images with masks; focal + Dice + image cross-entropy, Adam at 1e-3 / 1e-5, batch 8, 10 epochs, "
    "seed 111, frozen-feature cache), and anomalib's train split holds normal images only. Train with vip2clip, then "
    "pass the checkpoint to this model:\n"
    "  vip2clip train --data AUXILIARY_DATASET --out RUN --clip-weights ViT-L-14-336px.pt\n"
    "  anomalib test --model vip2clip.integrations.anomalib.ViP2CLIP --model.checkpoint RUN/checkpoint.pt "
    "--model.clip_weights ViT-L-14-336px.pt --data ..."
)


class _Scorer(nn.Module):
    """The torch model anomalib calls: normalised images [B, 3, S, S] -> InferenceBatch(pred_score [B],
    anomaly_map [B, S, S]), through `ViP2CLIP.predict` (fused with the reference memory when there is one)."""

    def __init__(self, network: ViP2CLIPNetwork) -> None:
        super().__init__()
        self.network = network
        self.references: ReferenceMemory | None = None

    def forward(self, images: torch.Tensor, exclude: list[str | None] | None = None) -> InferenceBatch:
        """exclude: per image, the pixel digest of the reference it is (leave-one-out, as `Predictor` does)."""
        if is_tracing():  # export: predict's computation without its no_grad / eval switching
            output = self.network(images)
            prediction = self.network.prediction_from_output(output, tuple(images.shape[-2:]))
        elif self.references is None:
            prediction = self.network.predict(images)
        else:
            prediction = ReferenceEngine(self.network, self.references).predict(images, exclude=exclude)
        return InferenceBatch(pred_score=prediction.pred_score, anomaly_map=prediction.anomaly_map)


class ViP2CLIP(AnomalibModule):
    """ViP²-CLIP in anomalib (module docstring; docs/anomalib.md).

    checkpoint, backbone, clip_weights, image_size, precision, top_k, sigma: as `vip2clip.create_model` (a
        checkpoint brings its own backbone, size and options; precision "auto" (default): bf16 on CPUs with native
        bf16, else fp32, decided when the model is built).
    random_init, allow_other_weights: as `vip2clip.create_model`: clip_weights are required unless random_init (the
        tiny test backbone excepted), and a checkpoint runs on the CLIP weights it was trained with unless
        allow_other_weights (`vip2clip.model.weights_policy`).
    k_shot: 0 (zero-shot) or k normal train images of the data module as references, drawn with `seed` (anomalib's
        WinCLIP's name and meaning).
    few_shot_source: a folder of normal images to take the references from instead of the train split: k_shot of
        them (drawn with `seed`), or all of them with k_shot=0 (where WinCLIP would ignore the folder).
    shots, reference: the old names of k_shot and few_shot_source (a FutureWarning; they will go).
    reference_cache: where reference memories are cached (default ~/.cache/vip2clip/references).
    pre_processor, post_processor, evaluator, visualizer: anomalib's components (True: ours / anomalib's default).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        backbone: str | None = None,
        clip_weights: str | Path | None = None,
        image_size: int | None = None,
        precision: str = "auto",
        top_k: int | None = None,
        sigma: float | None = None,
        k_shot: int = 0,
        seed: int = 111,
        few_shot_source: str | Path | None = None,
        reference_cache: str | Path | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        random_init: bool = False,
        allow_other_weights: bool = False,
        shots: int | None = None,
        reference: str | Path | None = None,
    ) -> None:
        k_shot, few_shot_source = _few_shot_arguments(k_shot, few_shot_source, shots=shots, reference=reference)
        options = {name: value for name, value in (("top_k", top_k), ("sigma", sigma)) if value is not None}
        spec = ModelSpec(
            checkpoint=checkpoint,
            clip_weights=clip_weights,
            random_init=random_init,
            backbone=backbone,
            image_size=image_size,
            precision=precision,
            config=options,
            allow_other_weights=allow_other_weights,
        )
        network, identity = build_model(spec)  # the assembly path of the command line and `Predictor`
        size = int(network.config.image_size)
        super().__init__(
            pre_processor=ReleasePreProcessor(size) if pre_processor is True else pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.model = _Scorer(network)
        self.identity = identity
        self.k_shot, self.seed, self.few_shot_source = k_shot, seed, few_shot_source
        self.reference_cache = Path(reference_cache) if reference_cache is not None else default_cache_dir()

    @property
    def network(self) -> ViP2CLIPNetwork:
        """The vip2clip model (`vip2clip.create_model`'s) inside."""
        return self.model.network

    @property
    def learning_type(self) -> LearningType:
        return LearningType.FEW_SHOT if self.k_shot or self.few_shot_source is not None else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {}

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | int | None = None) -> ReleasePreProcessor:
        """The release's resize (to a square side: the first of `image_size`, default 518) and normalisation."""
        side = image_size[0] if isinstance(image_size, tuple | list) else image_size
        return ReleasePreProcessor(int(side or 518))

    @staticmethod
    def configure_post_processor() -> ProbabilityPostProcessor:
        return ProbabilityPostProcessor()

    def configure_optimizers(self) -> None:
        raise RuntimeError(TRAINING_REFUSED)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(TRAINING_REFUSED)

    def on_validation_start(self) -> None:
        # anomalib's Engine.fit runs a verbose validation for zero-/few-shot models (test and predict validate
        # quietly first): say that nothing is trained, and how to train.
        if self.trainer.validate_loop.verbose:
            logger.warning(
                "anomalib's fit / validate only compute ViP2CLIP's thresholds; nothing is trained. %s", TRAINING_REFUSED
            )

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        """Scores the validation split, from which anomalib's PostProcessor computes its thresholds."""
        return self._scored(batch)

    def test_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        return self._scored(batch)

    def predict_step(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        return self._scored(batch)

    def _scored(self, batch: Batch) -> Batch:
        """The batch with pred_score and anomaly_map; an image that is one of the references is compared with the
        other references only (leave-one-out by pixel digest, as `Predictor` does)."""
        exclude = None
        paths = getattr(batch, "image_path", None)
        if self.model.references is not None and paths is not None:
            exclude = [self.model.references.own_digest(load_image(path), path) for path in paths]
        return batch.update(**self.model(batch.image, exclude)._asdict())

    def val_dataloader(self) -> list:
        """Used only without a data module (`engine.predict(data_path=...)`, `anomalib predict --data DIR`), where
        anomalib still validates a zero-shot model first: nothing to validate, thresholds stay at 0.5."""
        logger.warning(
            "no validation data (no data module): ViP2CLIP's thresholds stay at 0.5, uncalibrated; give a data "
            "module with labelled images to let anomalib compute F1-adaptive thresholds"
        )
        return []

    def setup(self, stage: str | None = None) -> None:
        """Before a run: say how the data module's own resizing relates to the model's; build the references."""
        del stage
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if datamodule is not None:
            self._report_resizes(datamodule)
        if self.learning_type == LearningType.FEW_SHOT and self.model.references is None:
            files = self._train_shots(datamodule) if self.few_shot_source is None else self._source_shots()
            memory = memory_from_files(self.network, self.identity, paths=files, cache_dir=self.reference_cache)
            logger.info("ViP2CLIP references: %d images (%d patches)", len(memory.files), memory.n_patches)
            self.model.references = memory

    def _train_shots(self, datamodule: Any) -> list[Path]:
        """`k_shot` normal images of the data module's train split, drawn as `vip2clip test --shots` draws them:
        from the sorted paths, by the (seed, class) generator; the class is the data module's category (or name)."""
        train = getattr(datamodule, "train_data", None)
        if train is None:
            raise ValueError(
                f"k_shot={self.k_shot} takes normal images from the data module's train split, and this run has no "
                "data module with one; pass few_shot_source=FOLDER (--model.few_shot_source) with normal images "
                "instead"
            )
        samples = train.samples
        paths = [str(path) for path in samples.loc[samples.label_index == 0, "image_path"]]
        class_name = str(getattr(datamodule, "category", None) or datamodule.name)
        return self._draw(paths, where=f"the train split of {datamodule.name} ({class_name})", class_name=class_name)

    def _source_shots(self) -> list[Path]:
        """The images of `few_shot_source`: all of them with k_shot=0, else k_shot drawn as from a train split
        (the folder's name as the class)."""
        files = reference_files(self.few_shot_source)
        if not self.k_shot:
            return files
        source = self.few_shot_source
        return self._draw([str(path) for path in files], where=f"few_shot_source {source}", class_name=source.name)

    def _draw(self, paths: list[str], *, where: str, class_name: str) -> list[Path]:
        if len(paths) < self.k_shot:
            raise ValueError(f"k_shot={self.k_shot}, but {where} holds {len(paths)} normal image(s)")
        chosen = draw_shots(sorted(paths), shots=self.k_shot, seed=self.seed, class_name=class_name)
        return [Path(path) for path in chosen]

    def _report_resizes(self, datamodule: Any) -> None:
        """A data module that resizes to another size than the model's: its images are resized again to the
        model's input, as `vip2clip test` resizes every image to the checkpoint's size; said, not refused."""
        size = self.network.config.image_size
        for name in ("augmentations", "train_augmentations", "val_augmentations", "test_augmentations"):
            for transform in _resizes(getattr(datamodule, name, None)):
                if list(transform.size) not in ([size], [size, size]):
                    logger.warning(
                        "the data module's %s resize images to %s; ViP2CLIP (trained at %d px) resizes them again "
                        "to %d x %d, as `vip2clip test` does: its scores are those at %d px",
                        name,
                        list(transform.size),
                        size,
                        size,
                        size,
                        size,
                    )

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:
        if self.model.references is not None:
            raise ValueError(
                "a ViP2CLIP with reference images (k_shot / few_shot_source) is not exported: the reference memory "
                "needs the PyTorch model; export the zero-shot model (k_shot=0, no few_shot_source) or use vip2clip's "
                "Predictor with --reference"
            )
        # torch's exporter writes opset 18; anomalib asks for 14, whose conversion fails on this graph with a logged
        # traceback (the file then keeps opset 18 all the same): ask for what is written.
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        return super().to_onnx(*args, **kwargs)


def _few_shot_arguments(
    k_shot: int, few_shot_source: str | Path | None, *, shots: int | None, reference: str | Path | None
) -> tuple[int, Path | None]:
    """(k_shot, few_shot_source) from anomalib's names or from their old names `shots` / `reference` (with a
    FutureWarning); ValueError when a name and its old name are both given, or for a negative k_shot."""
    given = {"k_shot": k_shot != 0, "few_shot_source": few_shot_source is not None}  # k_shot=0: the default
    for old, new, old_value in (("shots", "k_shot", shots), ("reference", "few_shot_source", reference)):
        if old_value is None:
            continue
        if given[new]:
            raise ValueError(f"give {new} (anomalib's name) or {old} (its old name), not both")
        message = f"ViP2CLIP's {old}= is now {new}= (anomalib's name, as in its WinCLIP); the old name will go"
        warnings.warn(message, FutureWarning, stacklevel=3)
    k_shot = k_shot if shots is None else shots
    few_shot_source = few_shot_source if reference is None else reference
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    return k_shot, None if few_shot_source is None else Path(few_shot_source)


def _resizes(transform: Any) -> list[Resize]:
    if isinstance(transform, Resize):
        return [transform]
    return [r for t in getattr(transform, "transforms", []) for r in _resizes(t)]
