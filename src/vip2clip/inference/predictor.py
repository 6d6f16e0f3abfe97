"""Predicting on images a practitioner has: PIL images, files or arrays, in their original sizes.

`Predictor` holds an inference engine (a `ViP2CLIP` model, the ONNX engine of `vip2clip.load_onnx`, or anything
with their `predict` and `config`), the model's identity and the decision thresholds. Images are preprocessed like
training (bicubic resize to the model's square input), scored in batches by one batching path (`Predictor.score`,
which every caller uses: `predict`, folder runs, calibration, the server), and each anomaly map is brought back to
the image's own size (bilinear), so masks and overlays line up with the original pixels. This module needs no
torch: with the ONNX engine, preprocessing, scoring and map resizing run on numpy and PIL alone.

Options: `tiling` (a `TileConfig`) scores large images tile by tile and stitches the maps at the original size
(`vip2clip.scoring.tiling`); `references` (a `ReferenceMemory` of normal images of the part) fuses a
nearest-neighbour map with the model's (`vip2clip.scoring.references`); `mutual` (a `MutualRule`) lets the images
given to one `score` / `predict` call judge each other (`vip2clip.scoring.mutual`). All go into the predictor's
identity, so that calibrations and prediction folders made with other options are refused.

Vocabulary (as anomalib's): `pred_score` the image score, `pred_label` the decision (a boolean: True anomalous; the
word "normal" / "anomalous" / "error" that files use is `ImageItem.verdict`), `anomaly_map` the map, `pred_mask`
the defect pixels. An image is anomalous when pred_score >= the image threshold; a pixel is a defect
when its map value >= the pixel threshold. Both are probabilities in [0, 1] (other values are refused); without a
calibration file or explicit thresholds both default to 0.5, which is uncalibrated and said so
(`Thresholds.source`; thresholds live in `vip2clip.inference.thresholds`).

Fail closed: an image whose score or map holds NaN or infinity (e.g. a checkpoint with NaN weights) is never
"normal". Its pred_label is None (verdict "error") and `ImageItem.error` says why; it has no defect pixels to report.
Folder runs (`vip2clip predict`, `vip2clip calibrate`) live in `vip2clip.runs.folder_run`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from vip2clip.config import ModelConfig
from vip2clip.data.images import BadImageError, ImageInput, to_rgb
from vip2clip.data.transforms import preprocess_array, resize_map
from vip2clip.inference import calibration as calib
from vip2clip.inference.assembly import ModelSpec, PredictorSpec, load_engine, load_reference_memory
from vip2clip.inference.identity import PredictorIdentity
from vip2clip.inference.judgeable import patch_size_of, unjudgeable_problem
from vip2clip.inference.thresholds import DEFAULT_THRESHOLD, MUTUAL_UNCALIBRATED, Thresholds, resolve_thresholds
from vip2clip.model.identity import ModelIdentity
from vip2clip.outputs import ImageBatch, ImageItem
from vip2clip.scoring.tiling import StitchedMap, TileConfig

if TYPE_CHECKING:
    import torch

    from vip2clip.scoring.mutual_rule import MutualRule
    from vip2clip.scoring.references import ReferenceMemory

logger = logging.getLogger(__name__)

T = TypeVar("T")


class InferenceEngine(Protocol):
    """What a Predictor needs from a model: its configuration and a batched, gradient-free predict (and, if it has
    one, its `identity`: the ONNX engine reads it from the file's metadata; else `ModelIdentity.of`)."""

    config: ModelConfig

    def predict(self, images: np.ndarray | torch.Tensor) -> ImageBatch:
        """images [B, 3, S, S] float32 (normalised) -> ImageBatch(pred_score [B], anomaly_map [B, S, S])."""
        ...


def non_finite_problem(pred_score: float, anomaly_map: np.ndarray) -> str | None:
    """Why a score and map [H, W] cannot be judged (NaN or infinite values), or None when they are finite."""
    bad_pixels = int(anomaly_map.size - np.count_nonzero(np.isfinite(anomaly_map)))
    if math.isfinite(pred_score) and bad_pixels == 0:
        return None
    parts = [] if math.isfinite(pred_score) else [f"image score {pred_score}"]
    if bad_pixels:
        parts.append(f"{bad_pixels} of {anomaly_map.size} map values")
    return f"NaN or infinite model output ({', '.join(parts)}): the checkpoint or CLIP weights are probably broken"


def make_result(
    pred_score: float, anomaly_map: np.ndarray, *, thresholds: Thresholds, scored: ImageItem | None = None
) -> ImageItem:
    """The decided `ImageItem` of one image from its score and its map [H, W] (pure; `scored`: the scored item
    whose input and image it keeps). Non-finite values give an item with an error and pred_label None (fail closed),
    never a normal one."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    scored = scored or ImageItem()
    kept = {"source": scored.source, "image": scored.image, "self_reference": scored.self_reference}
    kept.update(image_threshold=thresholds.image, pixel_threshold=thresholds.pixel)
    problem = non_finite_problem(float(pred_score), anomaly_map)
    if problem is not None:
        no_defects = np.zeros(anomaly_map.shape, dtype=bool)
        return ImageItem(pred_score=math.nan, anomaly_map=anomaly_map, pred_mask=no_defects, error=problem, **kept)
    anomalous = bool(pred_score >= thresholds.image)
    defects = anomaly_map >= thresholds.pixel
    return ImageItem(
        pred_score=float(pred_score), anomaly_map=anomaly_map, pred_label=anomalous, pred_mask=defects, **kept
    )


@dataclass
class _InFlight:
    """An image whose model inputs (itself, or its tiles) are being scored; `remaining` inputs to go.
    reference_digest: its pixel digest when it is one of the references (compared with the others only)."""

    scored: ImageItem
    stitched: StitchedMap | None = None
    remaining: int = 0
    reference_digest: str | None = None

    def model_input(self, tile: int) -> Image.Image:
        return self.scored.image if self.stitched is None else self.scored.image.crop(self.stitched.boxes[tile])


class Predictor:
    """Loads a model once and predicts on images of any size. Not thread-safe: serialise calls.

    Build one with `from_checkpoint` or `from_onnx`, or from an engine directly.

    Args:
        model: an inference engine: a `ViP2CLIP`, the ONNX engine of `vip2clip.load_onnx`, or anything with their
            `config` and `predict`.
        thresholds: the decision thresholds (default 0.5 for both, uncalibrated; see `resolve_thresholds`).
        batch_size: images (or tiles) per forward pass.
        identity: the model's `ModelIdentity` (default: the engine's, else `ModelIdentity.of(model)`).
        tiling: score large images tile by tile (`TileConfig`); None: whole images.
        references: a `ReferenceMemory` of normal images of the part, fused with the model's outputs.
        mutual: score each call's images against each other (batch zero-shot, `vip2clip.scoring.mutual`); its
            fused scores are judged only against calibrated or explicit thresholds, never the default 0.5.

    Raises:
        ValueError: batch_size below 1; `predict` / `result` with `mutual` and default thresholds.

    Example:
        >>> import numpy as np, vip2clip
        >>> predictor = vip2clip.Predictor(vip2clip.create_model("tiny", image_size=64, seed=0))
        >>> result = predictor.predict(np.zeros((48, 80, 3), dtype=np.uint8))[0]  # any size: maps come back in it
        >>> result.anomaly_map.shape, result.pred_mask.shape, type(result.pred_label)
        ((48, 80), (48, 80), <class 'bool'>)
        >>> result.verdict == ("anomalous" if result.pred_label else "normal")  # the word that files write
        True
        >>> predictor = Predictor.from_checkpoint("checkpoint.pt", calibration="calibration.json")  # doctest: +SKIP
        >>> result = predictor.predict("part.png")[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        model: InferenceEngine,
        thresholds: Thresholds | None = None,
        *,
        batch_size: int = 8,
        identity: ModelIdentity | None = None,
        tiling: TileConfig | None = None,
        references: ReferenceMemory | None = None,
        mutual: MutualRule | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.tiling = model, batch_size, tiling
        self.references, self.mutual = references, mutual
        self.thresholds = thresholds or Thresholds(DEFAULT_THRESHOLD, DEFAULT_THRESHOLD, "default (uncalibrated)", True)
        if references is not None:
            from vip2clip.scoring.references import ReferenceEngine  # imports torch: only with references
        self.engine = model if references is None else ReferenceEngine(model, references)  # what scores
        self._identity = identity
        self._patch_size = patch_size_of(model)  # too small or thin images are refused (`check_judgeable`)

    @classmethod
    def from_spec(cls, spec: PredictorSpec) -> Predictor:
        """The predictor of `spec` (`vip2clip.inference.assembly`: the one path the command line, the server and
        integrations take): the model or ONNX engine, the reference memory, the thresholds."""
        engine, identity = load_engine(spec.model)
        memory = load_reference_memory(spec, engine=engine, identity=identity)
        predictor = cls(
            engine,
            batch_size=spec.batch_size,
            identity=identity,
            tiling=spec.tiling,
            references=memory,
            mutual=spec.mutual,
        )
        if not spec.decide:
            return predictor
        thresholds = resolve_thresholds(
            predictor.identity,
            spec.calibration,
            image_threshold=spec.image_threshold,
            pixel_threshold=spec.pixel_threshold,
        )
        return predictor.with_thresholds(thresholds)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None,
        *,
        backbone: str | None = None,
        clip_weights: str | Path | None = None,
        calibration: str | Path | calib.Calibration | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        device: str = "cpu",
        image_size: int | None = None,
        precision: str = "auto",
        batch_size: int = 8,
        tiling: TileConfig | None = None,
        reference: str | Path | None = None,
        mutual: MutualRule | None = None,
        random_init: bool = False,
        allow_other_weights: bool = False,
        **config: Any,
    ) -> Predictor:
        """`from_spec` of a PyTorch model: `vip2clip.create_model`'s arguments (`config`: ModelConfig overrides;
        `clip_weights` required unless `random_init`, and a checkpoint runs on the CLIP weights it was trained with
        unless `allow_other_weights`: `vip2clip.model.weights_policy`;
        `precision` defaults to "auto", bf16 where the device computes it natively, as `vip2clip predict` does),
        the reference images in the folder `reference` (cached in `default_cache_dir()`) and the thresholds
        (`resolve_thresholds`); `mutual`: score the images of each call together."""
        model = ModelSpec(
            checkpoint=checkpoint,
            clip_weights=clip_weights,
            random_init=random_init,
            backbone=backbone,
            image_size=image_size,
            device=device,
            precision=precision,
            config=config,
            allow_other_weights=allow_other_weights,
        )
        decisions = {"calibration": calibration, "image_threshold": image_threshold, "pixel_threshold": pixel_threshold}
        options = {"tiling": tiling, "reference": reference, "batch_size": batch_size, "mutual": mutual}
        return cls.from_spec(PredictorSpec(model=model, **options, **decisions))

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        *,
        calibration: str | Path | calib.Calibration | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        batch_size: int = 8,
        tiling: TileConfig | None = None,
        backend: str = "auto",
        precision: str = "auto",
    ) -> Predictor:
        """`from_spec` of a model exported by `vip2clip.export_onnx`, on ONNX Runtime or OpenVINO (no torch
        needed; `precision` as `load_onnx`'s); the calibration is checked against the identity recorded in the
        file."""
        model = ModelSpec(onnx=path, onnx_backend=backend, precision=precision)
        decisions = {"calibration": calibration, "image_threshold": image_threshold, "pixel_threshold": pixel_threshold}
        return cls.from_spec(PredictorSpec(model=model, tiling=tiling, batch_size=batch_size, **decisions))

    @property
    def identity(self) -> PredictorIdentity:
        """The identity of the model (for a model without a checkpoint unless one was given) as this predictor
        uses it: with its tiling and its references' rule and files."""
        if self._identity is None:
            self._identity = getattr(self.model, "identity", None) or ModelIdentity.of(self.model)
        return PredictorIdentity(
            self._identity,
            tiling=None if self.tiling is None else self.tiling.to_dict(),
            references=None if self.references is None else self.references.record(),
            mutual=None if self.mutual is None else self.mutual.to_dict(),
        )

    @property
    def computation(self) -> dict[str, str]:
        """What computes the scores: {"engine": "torch" | "onnxruntime" | "openvino", "precision": what the model
        computes in (what "auto" chose), "why": the reason}. Outputs of another engine or precision are other
        numbers, so a prediction folder records the first two among its settings."""
        model = self.model
        return {
            "engine": getattr(model, "backend", "torch"),
            "precision": str(getattr(model, "precision", "fp32")),
            "why": str(getattr(model, "precision_reason", "") or "as the engine computes"),
        }

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def with_thresholds(self, thresholds: Thresholds) -> Predictor:
        """The same model and options with other thresholds (no reload)."""
        return Predictor(
            self.model,
            thresholds,
            batch_size=self.batch_size,
            identity=self._identity,
            tiling=self.tiling,
            references=self.references,
            mutual=self.mutual,
        )

    def score(
        self, inputs: Iterable[T], load: Callable[[T], Image.Image] = to_rgb, *, group: str = ""
    ) -> Iterator[ImageItem]:
        """Decode `inputs` with `load`, score their model inputs (each image, or each of its tiles) in batches of
        `batch_size`, yield one scored `ImageItem` per input in order (`source`: the input). A BadImageError from
        `load` is reported as the item's `error` and never stops the stream. Inputs are decoded only as the batches
        need them, and tiles are cut and preprocessed batch by batch, so memory holds the images of one batch (and
        their accumulators). With `mutual`, the inputs are one group (named `group` in errors) scored together
        (`mutual_group.score_group`) before any is yielded."""
        if self.mutual is not None:
            from vip2clip.scoring.mutual_group import score_group  # imports torch: only in mutual mode

            yield from score_group(self, list(inputs), load=load, name=group).scored()
            return
        queue: deque[_InFlight] = deque()
        batch: list[tuple[_InFlight, int]] = []
        for source in inputs:
            queue.append(self._start(source, load))
            for tile in range(queue[-1].remaining):
                batch.append((queue[-1], tile))
                if len(batch) == self.batch_size:
                    self._score_batch(batch)
                    batch = []
                    yield from _finished(queue)
        if batch:
            self._score_batch(batch)
        yield from _finished(queue)

    def _start(self, source: T, load: Callable[[T], Image.Image]) -> _InFlight:
        try:
            image = load(source)
            name = getattr(source, "path", None)
            self.check_judgeable(image, name)
            own = None if self.references is None else self.references.own_digest(image, name)
            stitched = None if self.tiling is None else StitchedMap(image.size, self.tiling, name=name)
        except BadImageError as error:
            return _InFlight(ImageItem(source=source, error=error.problem))
        scored = ImageItem(source=source, image=image, self_reference=own is not None)  # leave-one-out when `own`
        return _InFlight(scored, stitched, 1 if stitched is None else len(stitched.boxes), own)

    def _score_batch(self, batch: list[tuple[_InFlight, int]]) -> None:
        images = np.stack([preprocess_array(item.model_input(tile), self.image_size) for item, tile in batch])
        exclude = {"exclude": [item.reference_digest for item, _ in batch]} if self.references else {}
        scores, maps = self.engine.predict(images, **exclude).numpy()
        for (item, tile), score, anomaly_map in zip(batch, scores, maps, strict=True):
            item.remaining -= 1
            if item.stitched is None:
                item.scored = replace(item.scored, pred_score=float(score), anomaly_map=anomaly_map)
                continue
            item.stitched.add(tile, anomaly_map, score=float(score))
            if item.remaining == 0:
                pred_score, stitched_map = item.stitched.finish()
                item.scored, item.stitched = replace(item.scored, pred_score=pred_score, anomaly_map=stitched_map), None

    def result(self, scored: ImageItem) -> ImageItem:
        """The decisions for a scored image, with its map resized to the image's original size."""
        if scored.image is None or scored.anomaly_map is None:
            raise ValueError(f"{scored.source} was not scored: {scored.error}")
        self._check_decidable()
        anomaly_map = resize_map(scored.anomaly_map, scored.image.size)
        return make_result(scored.pred_score, anomaly_map, thresholds=self.thresholds, scored=scored)

    def check_judgeable(self, image: Image.Image, name: str | Path | None = None) -> None:
        """BadImageError naming `name` when the model cannot judge `image` or its tiles: too small or too thin
        (`judgeable.unjudgeable_problem`)."""
        tiling = self.tiling
        unit = image.size if tiling is None else (min(tiling.size, image.width), min(tiling.size, image.height))
        problem = unjudgeable_problem(unit, image_size=self.image_size, patch=self._patch_size)
        if problem is not None:
            raise BadImageError(name or "image", problem if tiling is None else f"its tiles: {problem}")

    def _check_decidable(self) -> None:
        """ValueError when mutual scores would be judged against the uncalibrated default 0.5 (not their scale)."""
        if self.mutual is not None and self.thresholds.uncalibrated:
            raise ValueError(MUTUAL_UNCALIBRATED)

    def predict(self, inputs: ImageInput | Iterable[ImageInput]) -> list[ImageItem]:
        """Predict on one input or a list of inputs (paths, PIL images, arrays); one result per input, in order.

        Every input is decoded before any is scored: an unreadable path, or an image too small or too thin to judge,
        raises BadImageError (a ValueError naming the file) before work starts.
        """
        self._check_decidable()
        single = isinstance(inputs, (str, Path, Image.Image, np.ndarray))
        items = [inputs] if single else list(inputs)
        images = [to_rgb(item) for item in items]
        for position, (item, image) in enumerate(zip(items, images, strict=True)):
            self.check_judgeable(
                image, item if isinstance(item, (str, Path)) else "image" if single else f"input {position}"
            )
        return [self.result(scored) for scored in self.score(images, load=lambda image: image)]


def _finished(queue: deque[_InFlight]) -> Iterator[ImageItem]:
    """Pop and yield the leading images whose inputs are all scored (input order is kept)."""
    while queue and queue[0].remaining == 0:
        yield queue.popleft().scored
