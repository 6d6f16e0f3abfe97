"""Which model produced a file: the one record written by calibration, evaluation, benchmark and predict alike.

Scores of another checkpoint, other CLIP weights, another input size or other top-K / smoothing are on another
scale, so a file that holds thresholds or scores records the model's identity, and a calibration refuses to be
used with a model whose identity differs (`ModelIdentity.mismatches`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vip2clip import __version__
from vip2clip.model.pretrained import CHECKPOINT, resolve_weights
from vip2clip.utils.hashing import file_sha256

if TYPE_CHECKING:
    from vip2clip.model.vip2clip import ViP2CLIP


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """checkpoint / checkpoint_sha256: the trained-weights file (None for a model without one).
    backbone, weights (where the CLIP weights came from), fingerprint (`FrozenCLIP.fingerprint()`).
    image_size, top_k, sigma: the options that change scores without retraining.
    fingerprint / top_k / sigma may be None in records written by older versions: then they are not compared.
    config: the full model configuration; vip2clip_version: the package that wrote the record.
    How a predictor uses the model (tiling, reference images) is recorded beside it, in
    `vip2clip.inference.identity.PredictorIdentity`.
    """

    backbone: str
    image_size: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    weights: str | None = None
    fingerprint: str | None = None
    top_k: int | None = None
    sigma: float | None = None
    config: dict[str, Any] | None = None
    vip2clip_version: str | None = None

    @classmethod
    def of(cls, model: ViP2CLIP, checkpoint: str | Path | None = None) -> ModelIdentity:
        """The identity of `model`, whose trainable weights were loaded from (or saved to) `checkpoint`."""
        config = model.config
        checkpoint = resolve_weights(checkpoint, CHECKPOINT)
        return cls(
            backbone=config.backbone,
            image_size=int(config.image_size),
            checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
            checkpoint_sha256=None if checkpoint is None else file_sha256(checkpoint),
            weights=model.backbone.weights_source,
            fingerprint=model.backbone.fingerprint(),
            top_k=config.top_k,
            sigma=config.sigma,
            config=config.to_dict(),
            vip2clip_version=__version__,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def mismatches(self, other: ModelIdentity, labels: tuple[str, str] = ("recorded", "used")) -> list[str]:
        """What differs between this record and `other`, in words ("image size: recorded 64, used 96"); [] if
        they describe the same model. `labels` name the two sides (e.g. "calibrated with", "model uses").

        Compared: checkpoint hash, backbone, CLIP weights fingerprint, input size, top_k and sigma (the last three
        only where both records know them). Paths, wording and package versions are not compared.
        """
        mine, theirs = labels
        problems = []
        if self.checkpoint_sha256 != other.checkpoint_sha256:
            problems.append(f"checkpoint: {mine} {_describe(self)}, {theirs} {_describe(other)}")
        if self.backbone != other.backbone:
            problems.append(f"backbone: {mine} {self.backbone!r}, {theirs} {other.backbone!r}")
        if None not in (self.fingerprint, other.fingerprint) and self.fingerprint != other.fingerprint:
            problems.append("backbone weights: the CLIP weights differ")
        for option, name in (("image_size", "image size"), ("top_k", "top_k"), ("sigma", "sigma")):
            a, b = getattr(self, option), getattr(other, option)
            if None not in (a, b) and a != b:
                problems.append(f"{name}: {mine} {a}, {theirs} {b}")
        return problems


def _describe(identity: ModelIdentity) -> str:
    if identity.checkpoint_sha256 is None:
        return "no checkpoint"
    return f"{identity.checkpoint} (sha256 {identity.checkpoint_sha256[:12]})"
