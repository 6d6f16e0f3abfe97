"""anomalib's pre- and post-processing hooks, configured for ViP²-CLIP (used by `vip2clip.integrations.anomalib`).

Pre-processing (`ReleasePreProcessor`, an anomalib `PreProcessor`): the release's resize and normalisation. Its
transform is `Compose([ReleaseResize(S), Normalize(OpenAI mean/std)])`. `ReleaseResize` is a torchvision `Resize`,
so anomalib's data modules find it and resize every image before batching, as they do with any model's Resize,
but it resizes as `vip2clip test` does: images with PIL's bicubic on 8-bit pixels (`resize_image`, the one
release resize), masks bilinearly and binarised at 0.5 (`preprocess_mask`) where torchvision would take the
nearest pixel. Exported graphs cannot run PIL: there the images go through torch's antialiased bicubic (PIL's
kernel, without the rounding to 8 bits), whatever `antialias` anomalib's export sets.

Post-processing (`ProbabilityPostProcessor`, an anomalib `PostProcessor`): ViP²-CLIP's scores and maps are already
probabilities in [0, 1], so they are not min-max normalised (anomalib's normalisation clamps scores outside the
validation split's range, which ties them and changes the test AUROC); anomalib's F1-adaptive thresholds, computed
on the validation split as usual, are applied to the probabilities themselves (0.5, vip2clip's uncalibrated
default, before any validation). Details and every protocol difference: docs/anomalib.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vip2clip.integrations.anomalib_support import require_anomalib

require_anomalib()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from anomalib.post_processing import PostProcessor  # noqa: E402
from anomalib.pre_processing import PreProcessor  # noqa: E402
from anomalib.pre_processing.utils.transform import get_exportable_transform  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize  # noqa: E402
from torchvision.transforms.v2.functional import to_dtype, to_image  # noqa: E402

from vip2clip.config import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from vip2clip.data.images import HIGH_BIT_DEPTH_MODES, BadImageError, check_mask_size, load_image  # noqa: E402
from vip2clip.data.transforms import preprocess_mask, resize_image  # noqa: E402
from vip2clip.inference.predictor import DEFAULT_THRESHOLD  # noqa: E402


def is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def release_resize_images(images: torch.Tensor, side: int) -> torch.Tensor:
    """Float images [..., 3, H, W] in [0, 1] -> [..., 3, S, S]: each one as 8-bit pixels through `resize_image`."""
    if tuple(images.shape[-2:]) == (side, side):
        return images
    flat = images.detach().reshape(-1, *images.shape[-3:]).cpu()
    pixels = (flat * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    resized = [np.asarray(resize_image(Image.fromarray(image), side)) for image in pixels]
    out = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return out.reshape(*images.shape[:-2], side, side).to(images.device)


def release_resize_masks(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Masks [..., H, W] (defect > 0) -> [..., S, S] of 0/1 in their dtype, each through `preprocess_mask`."""
    if tuple(masks.shape[-2:]) == (side, side):
        return masks
    flat = (masks.detach().reshape(-1, *masks.shape[-2:]) > 0).cpu().numpy()
    resized = torch.stack([preprocess_mask(mask, side) for mask in flat])
    return resized.reshape(*masks.shape[:-2], side, side).to(masks.dtype).to(masks.device)


BICUBIC_A = -0.5  # PIL's bicubic kernel parameter


def _pil_bicubic_weights(coordinates: torch.Tensor, side: int) -> torch.Tensor:
    """[S, N]: PIL's normalised bicubic weights from the N input positions `coordinates` (0..N-1, float) to S
    outputs, as PIL's `precompute_coeffs` computes them (window, support widened by the downscale), built from
    tensors only, so that a graph with a dynamic input size computes them for its input."""
    scale = (coordinates[-1:] + 1) / side  # [1]: N / S
    filter_scale = scale.clamp(min=1.0)
    support = 2.0 * filter_scale
    center = (torch.arange(side, dtype=coordinates.dtype, device=coordinates.device) + 0.5) * scale  # [S]
    low = torch.floor(center - support + 0.5).clamp(min=0)[:, None]
    high = torch.minimum(torch.floor(center + support + 0.5), coordinates[-1:] + 1)[:, None]
    x = ((coordinates[None] - center[:, None] + 0.5) / filter_scale).abs()  # [S, N]
    near = ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * BICUBIC_A
    weights = torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))
    weights = weights * ((coordinates[None] >= low) & (coordinates[None] < high))
    return weights / weights.sum(dim=1, keepdim=True)


def pil_like_resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> [B, 3, S, S] as PIL's bicubic resizes 8-bit images, in matrix products
    that every runtime computes alike (exported graphs cannot run PIL, and OpenVINO's antialiased cubic Resize
    differs from ONNX Runtime's): the width first, then the height, each pass rounded (halves up) and clipped to
    8 bits as PIL stores it. Equal to `resize_image` but for rare pixels one level apart (PIL's fixed-point
    weights; none in the tests)."""
    pixels = images * 255
    columns = torch.arange(images.shape[-1], dtype=images.dtype, device=images.device)
    pixels = torch.floor(pixels @ _pil_bicubic_weights(columns, side).T + 0.5).clamp(0, 255)  # [B, 3, H, S]
    rows = torch.arange(images.shape[-2], dtype=images.dtype, device=images.device)
    pixels = torch.floor(_pil_bicubic_weights(rows, side) @ pixels + 0.5).clamp(0, 255)  # [B, 3, S, S]
    return pixels / 255


class ReleaseResize(Resize):
    """A torchvision `Resize` to S x S that resizes as the release does (module docstring)."""

    def __init__(self, size: int) -> None:
        super().__init__((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.side = int(size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(release_resize_masks(inpt.as_subclass(torch.Tensor), self.side), like=inpt)
        if isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor:
            resized = release_resize_images(inpt.as_subclass(torch.Tensor), self.side)
            return tv_tensors.wrap(resized, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else resized
        return super().transform(inpt, params)


def release_transform(image_size: int) -> Compose:
    """The release's preprocessing as a torchvision transform: resize to S x S, OpenAI mean/std."""
    return Compose([ReleaseResize(image_size), Normalize(mean=list(OPENAI_MEAN), std=list(OPENAI_STD))])


def _file_mode(path: str | Path) -> str:
    with Image.open(path) as image:  # the header only
        return image.mode


def _augments(trainer: Any) -> bool:
    """Whether the run's data module augments its images (anomalib applies that when it reads them)."""
    datamodule = getattr(trainer, "datamodule", None)
    names = ("augmentations", "train_augmentations", "val_augmentations", "test_augmentations")
    return any(getattr(datamodule, name, None) is not None for name in names)


def read_as_vip2clip(batch: Any, *, augmented: bool, side: int) -> None:
    """Before the transform, in place: a mask whose size differs from its image's is refused, as `vip2clip test`
    refuses it (anomalib would stretch it over the image), and the images that anomalib's `read_image` reads
    otherwise than vip2clip (16-bit, 32-bit and float files, which its `convert("RGB")` clips to white) are read
    again with `vip2clip.data.images.load_image`, so that they score as in `vip2clip test`. augmented: whether the
    data module augments its images, which a re-read image would escape (refused: the message says what to do);
    side: the model's input size, to which the data module resizes each image it reads (`ReleaseResize`)."""
    image_paths = list(getattr(batch, "image_path", None) or [])
    mask_paths = list(getattr(batch, "mask_path", None) or [None] * len(image_paths))
    labels = getattr(batch, "gt_label", None)
    for index, (image_path, mask_path) in enumerate(zip(image_paths, mask_paths, strict=True)):
        if mask_path and labels is not None and bool(labels[index]):  # anomalib reads the masks of defects only
            check_mask_size(image_path, mask_path)
        mode = _file_mode(image_path)
        if mode not in HIGH_BIT_DEPTH_MODES:
            continue
        image = to_dtype(to_image(load_image(image_path)), torch.float32, scale=True)  # as anomalib reads 8 bits
        if tuple(batch.image.shape[-2:]) == (side, side):  # resized when read, as anomalib's data modules do
            image = release_resize_images(image, side)
        if augmented or image.shape[-2:] != batch.image.shape[-2:]:
            raise BadImageError(
                image_path,
                f"a {mode} image, which anomalib's reader clips to white; ViP2CLIP reads such images again with "
                "vip2clip's reader, which does not apply the data module's augmentations: drop them (ViP2CLIP "
                "resizes every image itself) or convert the images to 8 bits",
            )
        batch.image[index] = image.to(batch.image.device, batch.image.dtype)


class ReleasePreProcessor(PreProcessor):
    """anomalib's PreProcessor with the release's resize and normalisation at `image_size` (module docstring).
    Before it, images are read as vip2clip reads them where anomalib's reader differs (`read_as_vip2clip`)."""

    def __init__(self, image_size: int = 518) -> None:
        super().__init__(transform=release_transform(image_size))
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        read_as_vip2clip(batch, augmented=_augments(trainer), side=self.image_size)
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx)

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        read_as_vip2clip(batch, augmented=_augments(trainer), side=self.image_size)
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        read_as_vip2clip(batch, augmented=_augments(trainer), side=self.image_size)
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S] (anomalib's inference and export path)."""
        if not is_tracing():
            return super().forward(batch)
        return (pil_like_resize(batch, self.image_size) - self.mean) / self.std

    def checkpoint_config(self) -> dict[str, Any]:
        # anomalib's transform registry would store ReleaseResize as a plain Resize (nearest masks, no PIL)
        return {"release_image_size": self.image_size}

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        if "release_image_size" in config:
            self.image_size = int(config["release_image_size"])
            self.transform = release_transform(self.image_size)
            self.export_transform = get_exportable_transform(self.transform)


class ProbabilityPostProcessor(PostProcessor):
    """anomalib's PostProcessor for scores that are probabilities: no normalisation, F1-adaptive thresholds on the
    probabilities (0.5 until validation has computed them), a score at the threshold counted anomalous.
    `image_sensitivity` / `pixel_sensitivity` belong to anomalib's normalised scale and have no effect here."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["enable_normalization"] = False
        super().__init__(**kwargs)

    @property
    def normalized_image_threshold(self) -> torch.Tensor:
        return _or_default(self.image_threshold)

    @property
    def normalized_pixel_threshold(self) -> torch.Tensor:
        return _or_default(self.pixel_threshold)

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        super().load_checkpoint_config(config)
        self.enable_normalization = False

    @staticmethod
    def _apply_threshold(preds: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor | None:
        # `>=` as vip2clip decides and as the F1-adaptive threshold is computed (precision-recall curves count a
        # score equal to the threshold as positive); anomalib's `>` would flip the images at the threshold.
        return None if preds is None else preds >= threshold


def _or_default(threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(threshold), torch.full_like(threshold, DEFAULT_THRESHOLD), threshold)
