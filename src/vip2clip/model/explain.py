"""The paper's explanatory pictures as arrays (`ViP2CLIP.explain`): where each prompt looks and what each layer says.

- Fig. 3: ViP-FGP's cross-attention of the normal and of the anomalous prompt over the patch grid, per tapped
  layer (`FineGrainedPerception.attention`, the weights its forward pass pools the patches with, mean over heads).
- Fig. 7: the anomaly map of each tapped layer (its anomalous probability per patch, upsampled) beside the fused
  map. The fused map is the layer mean (Eq. 7) then smoothed; upsampling and smoothing are linear, so the layer
  maps average to the fused map both before smoothing (`layer_maps` -> `fused_map`) and after
  (`smoothed_layer_maps` -> `anomaly_map`, which is exactly `predict`'s map).

Nothing here runs when nothing asks for an explanation: `forward`/`predict` compute none of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vip2clip.model import utpa
from vip2clip.model.backbone import ImageFeatures
from vip2clip.model.fgp import FineGrainedPerception


@dataclass(kw_only=True)
class Explanation:
    """Arrays (float32, CPU) for a batch of B images of size H x W, L tapped layers on an h x w patch grid.

    pred_score [B] and anomaly_map [B, H, W]: as `predict` (fused, smoothed).
    fused_map [B, H, W]: the layer-mean anomalous probability upsampled, before smoothing.
    layer_maps [B, L, H, W]: each layer's anomalous probability upsampled, before smoothing (mean: fused_map).
    smoothed_layer_maps [B, L, H, W]: each layer's map smoothed like the fused one (mean: anomaly_map).
    attention [B, L, 2, h, w]: FGP attention of the (normal, anomalous) prompt over the patches, each map
    summing to 1; None for a model without ViP-FGP (its prompts attend to nothing).
    layers: the tapped blocks (1-based, e.g. 6, 12, 18, 24 for ViT-L/14); grid: (h, w).
    """

    pred_score: np.ndarray
    anomaly_map: np.ndarray
    fused_map: np.ndarray
    layer_maps: np.ndarray
    smoothed_layer_maps: np.ndarray
    attention: np.ndarray | None
    layers: tuple[int, ...]
    grid: tuple[int, int]

    def __len__(self) -> int:
        return int(self.pred_score.shape[0])


def _array(values: torch.Tensor) -> np.ndarray:
    return values.detach().float().cpu().numpy()


def layer_maps(
    probabilities: list[torch.Tensor], *, grid: tuple[int, int], size: tuple[int, int], sigma: float
) -> torch.Tensor:
    """Per layer [B, HW, 2] probabilities -> [B, L, H, W] anomalous maps, upsampled and smoothed with `sigma`
    (0: upsampled only)."""
    anomalous = [p.float()[..., utpa.ANOMALOUS_STATE] for p in probabilities]
    return torch.stack([utpa.smooth_map(p, grid=grid, size=size, sigma=sigma) for p in anomalous], 1)


def fgp_attention(
    fgp: FineGrainedPerception | None, text: torch.Tensor, *, features: ImageFeatures
) -> torch.Tensor | None:
    """[B, L, 2, h, w]: each layer's FGP attention of the two prompts (text [B or 1, 2, D]) over its patches."""
    if fgp is None:
        return None
    per_layer = torch.stack([fgp.attention(text, patches) for patches in features.patch_tokens], dim=1)
    return per_layer.view(*per_layer.shape[:3], *features.grid)


def make_explanation(
    pred_score: torch.Tensor,
    anomaly_map: torch.Tensor,
    *,
    probabilities: list[torch.Tensor],
    attention: torch.Tensor | None,
    layers: tuple[int, ...],
    grid: tuple[int, int],
    sigma: float,
) -> Explanation:
    """The Explanation of one forward pass (see the module docstring); size = anomaly_map's [H, W]."""
    size = tuple(anomaly_map.shape[-2:])
    fused = utpa.smooth_map(
        torch.stack([p.float()[..., utpa.ANOMALOUS_STATE] for p in probabilities]).mean(0),
        grid=grid,
        size=size,
        sigma=0.0,
    )
    return Explanation(
        pred_score=_array(pred_score),
        anomaly_map=_array(anomaly_map),
        fused_map=_array(fused),
        layer_maps=_array(layer_maps(probabilities, grid=grid, size=size, sigma=0.0)),
        smoothed_layer_maps=_array(layer_maps(probabilities, grid=grid, size=size, sigma=sigma)),
        attention=None if attention is None else _array(attention),
        layers=tuple(layers),
        grid=tuple(grid),
    )
