"""Reference images (few-shot): normal images of the part, kept as a memory of patch tokens to compare with.

Rule (measured on the synthetic benchmarks, docs/few-shot.md):
- memory: the patch tokens of every reference image (or of every tile, when tiling) at each tapped layer, as the
  model's encoder gives them (L2-normalised), stored as float16;
- per test patch and layer, the distance to its nearest reference patch, 1 - max cosine similarity, clipped to
  [0, 1]; averaged over the layers;
- the reference map: that patch-grid map upsampled (bilinear) and Gaussian-smoothed like the UTPA map
  (`utpa.smooth_map`, the model's sigma unless the rule gives another); the reference score: its maximum;
- fused with the model's zero-shot outputs: map = (1 - w) * zero-shot map + w * reference map, and the same
  for the image score, w = `FusionRule.weight`;
- leave-one-out: an image is never its own reference. Each reference's decoded pixels are hashed
  (`pixel_digest`); a test image with the same digest (the same file, a copy, the same upload) is compared with
  the other references only (`ReferenceEngine.predict(..., exclude=)`; `Predictor` passes the digests). Without
  this, `predict parts/ --reference parts/` compared each image with itself: every patch at distance 0, every
  defect scored like a normal part. An image that is the only reference cannot be judged that way: an error.

The memory is computed once per (model, reference files, tiling) and cached on disk (float16 .npy named by the
SHA-256 of its key, written atomically): the key holds the backbone, its weights fingerprint, the input size, the
tapped layers, the encoder precision, the tiling and the SHA-256 of every reference file; the pixel digest and the
number of memory rows of each image are kept in the entry's .json beside it. The checkpoint is not
part of it: patch tokens come from the frozen encoder alone. The nearest-neighbour search runs on the model's
device in chunks, holding at most `SEARCH_BUDGET` similarities (64 MiB of float32) at a time.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vip2clip.config import ModelConfig
from vip2clip.data.files import find_images
from vip2clip.data.images import BadImageError, load_image, pixel_digest
from vip2clip.data.transforms import preprocess
from vip2clip.model import utpa
from vip2clip.model.identity import ModelIdentity
from vip2clip.outputs import ImageBatch
from vip2clip.scoring.tiling import TileConfig, tile_boxes
from vip2clip.utils.fileio import atomic_save_npy, atomic_write_text
from vip2clip.utils.hashing import file_sha256, json_digest

logger = logging.getLogger(__name__)

CACHE_FORMAT = "vip2clip-reference-memory"
CACHE_VERSION = 2  # 2: the .json holds each image's pixel digest and memory rows (leave-one-out)
SEARCH_BUDGET = 1 << 24  # similarities (float32) held at once by the nearest-neighbour search: 64 MiB
_QUERY_CHUNK = 4096


@dataclass(frozen=True)
class FusionRule:
    """weight: share of the reference map and score in the fused outputs (1: references only);
    sigma: Gaussian smoothing of the reference map in model-input pixels (None: the model's sigma)."""

    weight: float = 0.75
    sigma: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"reference weight must be in (0, 1], got {self.weight}")
        if self.sigma is not None and self.sigma < 0:
            raise ValueError(f"reference sigma must be >= 0, got {self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "sigma": self.sigma, "distance": "1 - max cosine, clipped to [0, 1]"}


@dataclass(kw_only=True)
class ReferenceMemory:
    """tokens: per tapped layer [M, D] float16 patch tokens of the references; files: (path, sha256) per image;
    pixels: each image's `pixel_digest`; rows: how many of the M rows each image holds, in order (for
    leave-one-out; empty: unknown, nothing is left out)."""

    tokens: tuple[torch.Tensor, ...]
    files: tuple[tuple[str, str], ...]
    rule: FusionRule = field(default_factory=FusionRule)
    pixels: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()

    @property
    def n_patches(self) -> int:
        return int(self.tokens[0].shape[0])

    def count(self, digest: str | None) -> int:
        """How many reference images have these pixels (0 for None)."""
        return 0 if digest is None else self.pixels.count(digest)

    def own_digest(self, image: Image.Image, name: str | Path | None = None) -> str | None:
        """The `pixel_digest` of `image` (called `name`) when it is one of the references, to leave out; else None.
        BadImageError when every reference is this image: nothing would be left to compare it with."""
        digest = pixel_digest(image)
        copies = self.count(digest)
        if copies and copies == len(self.pixels):
            raise BadImageError(
                name or "image",
                "it is the only reference image (or every reference is a copy of it): nothing else to compare it with",
            )
        return digest if copies else None

    def keep_rows(self, digest: str) -> torch.Tensor:
        """bool [M]: the memory rows of every image except those with the pixel digest `digest`."""
        keep = torch.ones(self.n_patches, dtype=torch.bool, device=self.tokens[0].device)
        start = 0
        for pixels, rows in zip(self.pixels, self.rows, strict=True):
            if pixels == digest:
                keep[start : start + rows] = False
            start += rows
        return keep

    def record(self) -> dict[str, Any]:
        """What results and calibrations record: the rule, the images (paths and a digest of their hashes)."""
        digest = hashlib.sha256("".join(sorted(sha for _, sha in self.files)).encode()).hexdigest()
        return {"rule": self.rule.to_dict(), "images": [path for path, _ in self.files], "sha256": digest}

    def to(self, device: torch.device) -> ReferenceMemory:
        if self.tokens[0].device == device:
            return self
        return replace(self, tokens=tuple(t.to(device) for t in self.tokens))


def reference_files(folder: str | Path) -> list[Path]:
    """The images in `folder` (recursive). ValueError naming the folder when it is missing, not a folder,
    unreadable or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"reference folder {folder}: {'not a folder' if folder.exists() else 'does not exist'}")
    try:
        os.listdir(folder)
    except OSError as error:
        raise ValueError(f"reference folder {folder}: cannot be read ({error.strerror or error})") from None
    images = [image.path for image in find_images([folder])]
    if not images:
        raise ValueError(f"reference folder {folder}: holds no images (png, jpg, jpeg, bmp, tif, tiff, webp)")
    return images


def check_engine(engine: Any) -> None:
    """ValueError unless `engine.predict` can return the encoder's patch tokens (`return_features=True`)."""
    if "return_features" not in inspect.signature(engine.predict).parameters:
        raise ValueError(
            f"reference images need the encoder's patch tokens, which this inference engine "
            f"({type(engine).__name__}) does not give; use the PyTorch model for --reference / --shots"
        )


def _batched(items: Iterator[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    batch: list[torch.Tensor] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class BuiltTokens:
    """What `build_tokens` computes: per layer [M, D] float16 tokens, and each image's pixel digest and rows."""

    tokens: tuple[torch.Tensor, ...]
    pixels: tuple[str, ...]
    rows: tuple[int, ...]


def build_tokens(engine: Any, paths: Sequence[Path], *, tiling: TileConfig | None, batch_size: int = 8) -> BuiltTokens:
    """The patch tokens of every image (or every tile) in `paths`: per layer [M, D] float16 on the CPU.

    Images of any size are preprocessed to the model's input like test images. BadImageError names a reference
    file that cannot be decoded (a reference set with a broken image is the user's to fix, not to skip)."""
    check_engine(engine)
    size = engine.config.image_size
    pixels: list[str] = []
    inputs: list[int] = []  # model inputs (the image, or its tiles) per image

    def model_inputs() -> Iterator[torch.Tensor]:
        for path in paths:
            image = load_image(path)
            pixels.append(pixel_digest(image))
            boxes = [None] if tiling is None else tile_boxes(image.size, tiling, name=path)
            inputs.append(len(boxes))
            for box in boxes:
                yield preprocess(image if box is None else image.crop(box), size)

    layers: list[list[torch.Tensor]] = []
    for batch in _batched(model_inputs(), batch_size):
        features = engine.predict(torch.stack(batch), return_features=True).features
        tokens = [t.reshape(-1, t.shape[-1]).to("cpu", torch.float16) for t in features.patch_tokens]
        layers = layers or [[] for _ in tokens]
        for stored, new in zip(layers, tokens, strict=True):
            stored.append(new)
    tokens = tuple(torch.cat(chunks) for chunks in layers)
    per_input = int(tokens[0].shape[0]) // max(1, sum(inputs))
    return BuiltTokens(tokens, tuple(pixels), tuple(count * per_input for count in inputs))


def memory_key(identity: ModelIdentity, engine: Any, *, tiling: TileConfig | None, shas: Sequence[str]) -> dict:
    """What the memory depends on (see the module docstring)."""
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "backbone": identity.backbone,
        "fingerprint": identity.fingerprint,
        "image_size": identity.image_size,
        "feature_layers": (identity.config or {}).get("feature_layers"),
        "precision": getattr(engine, "precision", "fp32"),
        "tiling": None if tiling is None else tiling.to_dict(),
        "files": list(shas),
    }


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vip2clip/references (~/.cache/vip2clip/references)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vip2clip" / "references"


def _read_cache(path: Path, n_layers: int | None, n_files: int) -> BuiltTokens | None:
    try:
        stacked = np.load(path, allow_pickle=False)
        images = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["images"]
        pixels, rows = tuple(str(image["pixels"]) for image in images), tuple(int(image["rows"]) for image in images)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("reference cache %s unreadable (%s): rebuilding", path, error)
        return None
    if stacked.ndim != 3 or stacked.dtype != np.float16 or (n_layers is not None and stacked.shape[0] != n_layers):
        logger.warning("reference cache %s has an unexpected shape %s: rebuilding", path, stacked.shape)
        return None
    if len(rows) != n_files or sum(rows) != stacked.shape[1]:
        logger.warning("reference cache %s: its image list does not match its rows: rebuilding", path)
        return None
    return BuiltTokens(tuple(torch.from_numpy(layer.copy()) for layer in stacked), pixels, rows)


def memory_from_files(
    engine: Any,
    identity: ModelIdentity,
    *,
    paths: Sequence[str | Path],
    tiling: TileConfig | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    rule: FusionRule | None = None,
) -> ReferenceMemory:
    """The memory of the reference images `paths` for `engine` (whose identity is `identity`): read from
    `cache_dir` when it holds this key, else built (and written there). cache_dir None: no disk cache."""
    check_engine(engine)
    paths = [Path(path).resolve() for path in paths]
    if not paths:
        raise ValueError("no reference images given")
    shas = [file_sha256(path) for path in paths]
    key = memory_key(identity, engine, tiling=tiling, shas=shas)
    cache = None if cache_dir is None else Path(cache_dir) / f"{json_digest(key, 32)}.npy"
    layers = (identity.config or {}).get("feature_layers")
    built = _read_cache(cache, len(layers) if layers else None, len(paths)) if cache and cache.is_file() else None
    if built is None:
        built = build_tokens(engine, paths, tiling=tiling, batch_size=batch_size)
        if cache is not None:
            images = [{"pixels": pixels, "rows": rows} for pixels, rows in zip(built.pixels, built.rows, strict=True)]
            # The .json first: a reader needs both, and the .npy is what makes the entry exist.
            atomic_write_text(cache.with_suffix(".json"), json.dumps({**key, "images": images}, indent=1) + "\n")
            atomic_save_npy(torch.stack(built.tokens).numpy(), cache)
            logger.info("reference memory cached in %s", cache)
    else:
        logger.info("reference memory read from %s", cache)
    files = tuple((str(path), sha) for path, sha in zip(paths, shas, strict=True))
    return ReferenceMemory(
        tokens=built.tokens, files=files, rule=rule or FusionRule(), pixels=built.pixels, rows=built.rows
    )


def load_references(
    engine: Any,
    identity: ModelIdentity,
    *,
    folder: str | Path,
    tiling: TileConfig | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    rule: FusionRule | None = None,
) -> ReferenceMemory:
    """`memory_from_files` of the images in `folder` (`reference_files`)."""
    return memory_from_files(
        engine,
        identity,
        paths=reference_files(folder),
        tiling=tiling,
        batch_size=batch_size,
        cache_dir=cache_dir,
        rule=rule,
    )


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor, *, budget: int = SEARCH_BUDGET) -> torch.Tensor:
    """queries [B, HW, D], memory [M, D] (both L2-normalised, same device) -> [B, HW] of 1 - max cosine similarity
    to any memory row, clipped to [0, 1]; computed in chunks of at most `budget` similarities."""
    flat = queries.reshape(-1, queries.shape[-1]).float()
    query_chunk = min(flat.shape[0], _QUERY_CHUNK)
    memory_chunk = max(1, budget // max(1, query_chunk))
    best = torch.full((flat.shape[0],), -1.0, device=flat.device)
    for q in range(0, flat.shape[0], query_chunk):
        rows = flat[q : q + query_chunk]
        for m in range(0, memory.shape[0], memory_chunk):
            similarity = rows @ memory[m : m + memory_chunk].float().T
            best[q : q + query_chunk] = torch.maximum(best[q : q + query_chunk], similarity.amax(dim=1))
    return (1.0 - best).clamp(0.0, 1.0).view(queries.shape[:-1])


class ReferenceEngine:
    """An inference engine (like `ViP2CLIP`: `config`, `predict(images) -> ImageBatch`) that fuses the wrapped
    engine's outputs with the reference map and score of `memory` (rule in the module docstring)."""

    def __init__(self, engine: Any, memory: ReferenceMemory) -> None:
        check_engine(engine)
        self.engine = engine
        self.memory = memory
        self.config: ModelConfig = engine.config

    def predict(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        exclude: Sequence[str | None] | None = None,
        return_features: bool = False,
    ) -> ImageBatch:
        """images [B, 3, S, S] -> fused ImageBatch(pred_score [B], anomaly_map [B, S, S]).

        exclude: per image, the `pixel_digest` of the picture it is (or is a tile of): the references with these
        pixels are left out of its nearest-neighbour search (leave-one-out; module docstring). return_features: the
        ImageBatch carries the encoder's outputs (for mutual scoring on top)."""
        prediction = self.engine.predict(images, return_features=True)
        features = prediction.features
        if len(features.patch_tokens) != len(self.memory.tokens):
            raise ValueError(
                f"the reference memory has {len(self.memory.tokens)} layers but the model taps "
                f"{len(features.patch_tokens)}; rebuild it with this model"
            )
        self.memory = self.memory.to(features.patch_tokens[0].device)
        with torch.no_grad():
            distance = torch.stack(
                [nearest_distance(t, m) for t, m in zip(features.patch_tokens, self.memory.tokens, strict=True)]
            ).mean(dim=0)  # [B, HW]
            for row, digest in enumerate(exclude or ()):
                if self.memory.count(digest):
                    distance[row] = self._distance_without(features.patch_tokens, row, digest)
            rule = self.memory.rule
            sigma = self.config.sigma if rule.sigma is None else rule.sigma
            reference_map = utpa.smooth_map(distance, grid=features.grid, size=tuple(images.shape[-2:]), sigma=sigma)
            reference_score = reference_map.flatten(1).amax(dim=1)
        weight = rule.weight
        return ImageBatch(
            pred_score=(1 - weight) * prediction.pred_score + weight * reference_score,
            anomaly_map=(1 - weight) * prediction.anomaly_map + weight * reference_map,
            features=features if return_features else None,
        )

    def _distance_without(self, patch_tokens: Sequence[torch.Tensor], row: int, digest: str) -> torch.Tensor:
        """[HW] distance of image `row` to the references other than those with pixel digest `digest`."""
        keep = self.memory.keep_rows(digest)
        if not keep.any():
            raise ValueError("an image cannot be judged against references that are all the image itself")
        layers = zip(patch_tokens, self.memory.tokens, strict=True)
        return torch.stack([nearest_distance(t[row : row + 1], m[keep]) for t, m in layers]).mean(dim=0)[0]
