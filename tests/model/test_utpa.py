"""UTPA pure functions against direct formulas and SciPy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vip2clip.model import utpa


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
    torch.testing.assert_close(utpa.global_image_logits(feature, text, temperature=0.07), feature @ text[0].T / 0.07)
