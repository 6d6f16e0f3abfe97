"""UTPA scoring, unified text-patch alignment (paper Sec. 4.2, Eqs. 7-8), as pure tensor functions.

Per layer l: cosine similarities of every patch token to the two layer-specific prompts, and their
softmax at temperature tau. The pixel map is the anomalous probability, bilinearly upsampled, averaged
over layers and Gaussian-smoothed. The image score pools the raw similarities of each layer's top-K
most anomalous patches over all layers, then applies the softmax at tau (the release's form of Eq. 8).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

NORMAL_STATE, ANOMALOUS_STATE = 0, 1  # the state axis of logits and probabilities: (normal, anomalous)


def patch_similarity(patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """patches [B, HW, D], text [B, 2, D] (both normalised) -> cosine similarities [B, HW, 2]."""
    return patches @ text.transpose(1, 2)


def state_probabilities(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., 2] similarities -> softmax over the (normal, anomalous) states at temperature tau."""
    return (similarity / temperature).softmax(dim=-1)


def topk_image_logits(
    similarities: list[torch.Tensor], probabilities: list[torch.Tensor], *, top_k: int, temperature: float
) -> torch.Tensor:
    """Image logits [B, 2]: the mean raw similarity of each layer's top-K anomalous patches, over all layers, / tau."""
    pooled = []
    for similarity, probability in zip(similarities, probabilities, strict=True):
        k = min(top_k, similarity.shape[1])
        index = probability[..., ANOMALOUS_STATE].topk(k, dim=1).indices  # [B, K]
        pooled.append(similarity.gather(1, index.unsqueeze(-1).expand(-1, -1, similarity.shape[-1])))
    return torch.cat(pooled, dim=1).mean(dim=1) / temperature


def global_image_logits(global_feature: torch.Tensor, text: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Dual-branch baseline (UTPA off): global feature [B, D] against the prompts [B or 1, 2, D] -> [B, 2] / tau."""
    return (global_feature.unsqueeze(1) * text).sum(-1) / temperature


def to_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, HW, C] -> [B, C, h, w]."""
    return values.transpose(1, 2).reshape(values.shape[0], values.shape[2], *grid)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W], bilinear, align_corners=False (as the release)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def smoothed_anomaly_map(
    probabilities: list[torch.Tensor], *, grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """Layer-mean anomalous probability, upsampled (bilinear) and Gaussian-smoothed -> [B, H, W].

    Equal to the release's per-layer upsampling, averaging and scipy `gaussian_filter` (mode "reflect"):
    averaging commutes with the linear upsampling, and upsampling (bilinear, align_corners=False) and the
    Gaussian are both linear and separable, so the whole map is A_h @ P @ A_w^T with P the [B, h, w]
    layer-mean probability and A = blur @ upsample a [H, h] matrix per axis (cached). At 518 px from a 37x37
    grid that is ~20 MFLOP per image instead of a 65-tap convolution over 518x518 pixels, on the maps' device.
    """
    mean = torch.stack([p[..., ANOMALOUS_STATE] for p in probabilities]).mean(dim=0)  # [B, HW]
    return smooth_map(mean, grid=grid, size=size, sigma=sigma)


def smooth_map(values: torch.Tensor, *, grid: tuple[int, int], size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Patch values [B, HW] -> [B, H, W]: bilinear upsampling then the Gaussian (sigma in output pixels, scipy
    "reflect" borders; sigma 0: upsampling only), as one cached matrix product per axis."""
    device, dtype = values.device, values.dtype
    rows = _smoothing_operator(grid[0], size[0], sigma=float(sigma), device=device, dtype=dtype)  # [H, h]
    cols = _smoothing_operator(grid[1], size[1], sigma=float(sigma), device=device, dtype=dtype)  # [W, w]
    return rows @ values.reshape(-1, *grid) @ cols.T


@functools.lru_cache(maxsize=32)
def _smoothing_operator(
    length: int, size: int, *, sigma: float, device: torch.device, dtype: torch.dtype, truncate: float = 4.0
) -> torch.Tensor:
    """[size, length]: 1-D bilinear upsampling then scipy-style Gaussian, built by applying both to unit impulses."""
    impulses = torch.eye(length, dtype=torch.float64).unsqueeze(0)  # [1, length (channels), length]
    upsampled = F.interpolate(impulses, size=size, mode="linear", align_corners=False)[0]  # [length, size]
    if sigma > 0:
        # Blur along the last axis only: one row per impulse, a singleton middle axis that the kernel leaves as is.
        kernel = _gaussian_kernel(sigma, truncate)
        x = _reflect_pad(upsampled.unsqueeze(1), kernel.numel() // 2, dim=2)
        upsampled = F.conv1d(x, kernel.view(1, 1, -1))[:, 0]
    return upsampled.T.contiguous().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _gaussian_kernel(sigma: float, truncate: float) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()  # float64: callers cast


def _reflect_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad `dim` by `radius` with scipy's half-sample symmetric reflection (repeated for tiny inputs)."""
    size = x.shape[dim]
    if radius <= size:
        before = x.narrow(dim, 0, radius).flip(dim)
        after = x.narrow(dim, size - radius, radius).flip(dim)
        return torch.cat([before, x, after], dim=dim)
    # Inputs smaller than the kernel radius: tile the symmetric period (x, flip(x)) as scipy does.
    period = torch.cat([x, x.flip(dim)], dim=dim)
    reps = math.ceil((radius + size) / (2 * size)) + 1
    tiled = torch.cat([period] * (2 * reps), dim=dim)
    start = reps * 2 * size - radius
    return tiled.narrow(dim, start, size + 2 * radius)
