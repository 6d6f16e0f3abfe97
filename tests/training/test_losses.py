"""Losses against hand-computed values and a literal per-pixel implementation of the release's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from vip2clip.training.losses import dice_loss, focal_loss, image_loss, training_loss


def naive_focal(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> float:
    """Pixel by pixel: clamped one-hot, pt = <one_hot, p> + smooth, -(1 - pt)^gamma log pt, mean over pixels."""
    batch, classes, height, width = probs.shape
    total, count = 0.0, 0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(target[b, y, x])
                pt = smooth
                for c in range(classes):
                    one_hot = 1.0 - smooth if c == label else smooth / (classes - 1)
                    pt += one_hot * float(probs[b, c, y, x])
                total += -((1.0 - pt) ** gamma) * math.log(pt)
                count += 1
    return total / count


def naive_dice(p: torch.Tensor, g: torch.Tensor) -> float:
    per_image = []
    for pi, gi in zip(p.tolist(), g.tolist(), strict=True):
        flat_p = [v for row in pi for v in row]
        flat_g = [v for row in gi for v in row]
        inter = sum(a * b for a, b in zip(flat_p, flat_g, strict=True))
        per_image.append(1.0 - (2 * inter + 1) / (sum(flat_p) + sum(flat_g) + 1))
    return sum(per_image) / len(per_image)


def random_case(seed: int, batch: int = 3, size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.randn(batch, 2, size, size, generator=generator, dtype=torch.float64).softmax(dim=1)
    masks = (torch.rand(batch, size, size, generator=generator) > 0.7).double()
    return probs, masks


def test_focal_hand_computed_single_pixel() -> None:
    probs = torch.tensor([0.2, 0.8], dtype=torch.float64).view(1, 2, 1, 1)
    # anomalous pixel: pt = 1e-5 * 0.2 + (1 - 1e-5) * 0.8 + 1e-5 = 0.800004
    expected = -((1 - 0.800004) ** 2) * math.log(0.800004)
    assert focal_loss(probs, torch.ones(1, 1, 1, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)
    # normal pixel: pt = (1 - 1e-5) * 0.2 + 1e-5 * 0.8 + 1e-5 = 0.200016
    expected = -((1 - 0.200016) ** 2) * math.log(0.200016)
    assert focal_loss(probs, torch.zeros(1, 1, 1, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)


def test_focal_of_a_perfect_prediction_is_zero_and_finite_at_certainty() -> None:
    probs = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    assert focal_loss(probs, torch.ones(1, 1, 1)).item() == pytest.approx(0.0, abs=1e-12)
    wrong = focal_loss(probs, torch.zeros(1, 1, 1))
    assert math.isfinite(wrong.item()) and wrong.item() == pytest.approx(-((1 - 2e-5) ** 2) * math.log(2e-5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_focal_matches_naive(seed: int) -> None:
    probs, masks = random_case(seed)
    assert focal_loss(probs, masks).item() == pytest.approx(naive_focal(probs, masks), rel=1e-10)


def test_dice_hand_computed() -> None:
    p = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])
    g = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    # image 1: 1 - (2*0.5 + 1) / (1 + 1 + 1) = 1/3; image 2: 1 - 3/3 = 0; mean 1/6
    assert dice_loss(p, g).item() == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", [0, 1])
def test_dice_matches_naive(seed: int) -> None:
    probs, masks = random_case(seed)
    assert dice_loss(probs[:, 1], masks).item() == pytest.approx(naive_dice(probs[:, 1], masks), rel=1e-10)


def test_image_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    expected = (-math.log(math.exp(-1) / (math.exp(2) + math.exp(-1))) + math.log(2)) / 2
    assert image_loss(logits, labels).item() == pytest.approx(expected)


def test_training_loss_sums_layers_and_terms() -> None:
    layers = [random_case(seed)[0] for seed in (3, 4)]
    masks = random_case(3)[1]
    logits = torch.tensor([[0.3, 0.1], [1.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1])
    parts = training_loss(layers, masks, image_logits=logits, labels=labels)
    focal = sum(naive_focal(p, masks) for p in layers)
    dice = sum(naive_dice(p[:, 1], masks) + naive_dice(p[:, 0], 1 - masks) for p in layers)
    assert parts.focal.item() == pytest.approx(focal, rel=1e-10)
    assert parts.dice.item() == pytest.approx(dice, rel=1e-10)
    assert parts.total.item() == pytest.approx(focal + dice + image_loss(logits, labels).item(), rel=1e-10)
    assert set(parts.as_floats()) == {"total", "focal", "dice", "image"}


def test_gradients_flow_to_probabilities() -> None:
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    masks = (torch.rand(2, 4, 4) > 0.5).float()
    parts = training_loss(
        [logits.softmax(dim=1)], masks, image_logits=torch.zeros(2, 2, requires_grad=True), labels=torch.tensor([0, 1])
    )
    parts.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
