"""UTPA pure functions against direct formulas and SciPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vip2clip.model import utpa


@pytest.mark.parametrize(("shape", "sigma"), [((2, 64, 64), 8.0), ((1, 37, 50), 4.0), ((1, 10, 12), 8.0)])
def test_gaussian_blur_equals_scipy_reflect(shape, sigma):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    ours = utpa.gaussian_blur(maps, sigma).numpy()
    reference = np.stack([gaussian_filter(m.numpy().astype(np.float64), sigma=sigma) for m in maps])
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_gaussian_blur_zero_sigma_is_identity():
    maps = torch.rand(1, 8, 8)
    assert utpa.gaussian_blur(maps, 0) is maps


def test_fused_map_equals_upsample_then_average():
    grid, size = (5, 4), (40, 33)
    probabilities = [torch.rand(2, 20, 2).softmax(-1) for _ in range(4)]
    fused = utpa.fused_anomaly_map(probabilities, grid, size)
    per_layer = [
        F.interpolate(p.transpose(1, 2).reshape(2, 2, *grid), size=size, mode="bilinear", align_corners=False)[:, 1]
        for p in probabilities
    ]
    torch.testing.assert_close(fused, torch.stack(per_layer).mean(0), rtol=1e-5, atol=1e-6)


def test_to_grid_is_row_major():
    values = torch.arange(6.0).view(1, 6, 1)
    assert utpa.to_grid(values, (2, 3))[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_topk_pools_the_most_anomalous_patches_of_each_layer():
    sim = torch.tensor([[[0.0, 0.9], [0.0, 0.1], [0.5, 0.0]]])  # patch 0 most anomalous, then 1
    prob = utpa.state_probabilities(sim, 0.07)
    logits = utpa.topk_image_logits([sim, sim], [prob, prob], top_k=2, temperature=0.07)
    torch.testing.assert_close(logits, torch.tensor([[0.0, 0.5]]) / 0.07)
    big_k = utpa.topk_image_logits([sim], [prob], top_k=50, temperature=0.07)  # clamped to the patch count
    torch.testing.assert_close(big_k, sim.mean(1) / 0.07)


def test_global_image_logits():
    feature = F.normalize(torch.randn(3, 8), dim=-1)
    text = F.normalize(torch.randn(1, 2, 8), dim=-1)
    torch.testing.assert_close(utpa.global_image_logits(feature, text, 0.07), feature @ text[0].T / 0.07)
