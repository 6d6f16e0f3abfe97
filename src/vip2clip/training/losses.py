"""Training losses of the authors' release (paper Sec. 4.3): focal + two Dice terms per layer, plus image CE.

The release uses AnomalyCLIP's loss code; the details that change the numbers are kept here:
- Focal loss runs on the *probabilities* (the 2-channel softmax map), not on logits. alpha is None (every
  class weighted 1), gamma 2. The one-hot target is clamped to [smooth/(C-1), 1-smooth] with smooth 1e-5,
  pt = sum_c(one_hot_c * p_c) + smooth, the loss -(1-pt)^gamma * log(pt) is averaged over every pixel of the
  batch (the 'mean' reduction over B*H*W).
- Dice = 1 - (2*sum(p*g) + 1) / (sum(p) + sum(g) + 1) per image, averaged over the batch; once on the
  anomalous channel against the mask, once on the normal channel against 1 - mask.
- Per layer focal + both Dice terms, summed over the tapped layers, plus cross-entropy of the image
  logits [B, 2] against the image label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vip2clip.model.utpa import ANOMALOUS_STATE, NORMAL_STATE

FOCAL_SMOOTH = 1e-5
DICE_SMOOTH = 1.0


def focal_loss(
    probabilities: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, smooth: float = FOCAL_SMOOTH
) -> torch.Tensor:
    """Focal loss on probabilities [B, C, H, W] against class indices target [B, H, W] (0/1 floats ok) -> scalar."""
    num_classes = probabilities.shape[1]
    flat = probabilities.movedim(1, -1).reshape(-1, num_classes)  # [B*H*W, C]
    one_hot = F.one_hot(target.reshape(-1).long(), num_classes).to(flat.dtype)
    one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probability: torch.Tensor, target: torch.Tensor, *, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice loss of one channel [B, H, W] against a 0/1 target [B, H, W], averaged over the batch -> scalar."""
    p = probability.reshape(probability.shape[0], -1)
    g = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * g).sum(dim=1) + smooth) / (p.sum(dim=1) + g.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def image_loss(image_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of image logits [B, 2] (already / temperature) against labels [B] (0 normal, 1 anomalous)."""
    return F.cross_entropy(image_logits, labels.long())


@dataclass(frozen=True)
class LossParts:
    """The total loss (with gradient) and its parts (summed over layers) as tensors."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    image: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "focal", "dice", "image")}


def training_loss(
    probability_maps: Sequence[torch.Tensor], masks: torch.Tensor, *, image_logits: torch.Tensor, labels: torch.Tensor
) -> LossParts:
    """The release's loss: per layer map [B, 2, H, W] (normal, anomalous) vs masks [B, H, W], plus image CE."""
    focal = sum(focal_loss(maps, masks) for maps in probability_maps)
    dice = sum(
        dice_loss(maps[:, ANOMALOUS_STATE], masks) + dice_loss(maps[:, NORMAL_STATE], 1.0 - masks)
        for maps in probability_maps
    )
    image = image_loss(image_logits, labels)
    return LossParts(total=focal + dice + image, focal=focal, dice=dice, image=image)
