"""The rewritten hot paths equal straightforward independent implementations.

- ViP-FGP attends over raw patches and folds the k/v projections into the query side; the reference here
  projects every patch, as the release does.
- `utpa.smoothed_anomaly_map` applies upsampling and the Gaussian as cached matrices; the reference is a
  numpy bilinear resize (align_corners=False) followed by scipy's gaussian_filter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from vip2clip.model import utpa
from vip2clip.model.fgp import FineGrainedPerception


def reference_fgp(module: FineGrainedPerception, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention: project text to q and every patch to k and v; no 1/sqrt(d) scaling."""
    batch, length, dim = patches.shape
    heads, head_dim = module.heads, dim // module.heads
    text = text.expand(batch, -1, -1)
    q = module.q_proj(text).view(batch, -1, heads, head_dim).permute(0, 2, 1, 3)
    k = module.k_proj(patches).view(batch, length, heads, head_dim).permute(0, 2, 1, 3)
    v = module.v_proj(patches).view(batch, length, heads, head_dim).permute(0, 2, 1, 3)
    weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    merged = (weights @ v).permute(0, 2, 1, 3).reshape(batch, -1, dim)
    return F.normalize(module.out_proj(merged), dim=-1)


@pytest.mark.parametrize(("batch", "text_batch", "patches", "dim", "heads"), [(2, 1, 16, 64, 8), (3, 3, 50, 96, 4)])
def test_fgp_equals_projected_attention(batch, text_batch, patches, dim, heads):
    torch.manual_seed(0)
    module = FineGrainedPerception(dim, heads)
    for layer in (module.k_proj, module.v_proj):
        torch.nn.init.normal_(layer.bias, std=0.3)  # non-zero biases: the fold must handle them
    text = F.normalize(torch.randn(text_batch, 2, dim), dim=-1)
    tokens = F.normalize(torch.randn(batch, patches, dim), dim=-1) * 4  # sharper softmax than unit vectors
    with torch.no_grad():
        expected = reference_fgp(module, text, tokens)
        actual = module(text, tokens)
    assert actual.shape == (batch, 2, dim)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_fgp_gradients_match_reference():
    torch.manual_seed(1)
    module = FineGrainedPerception(32, 4)
    text = F.normalize(torch.randn(1, 2, 32), dim=-1)
    tokens = F.normalize(torch.randn(2, 9, 32), dim=-1)
    target = torch.randn(2, 2, 32)
    grads = []
    for forward in (module.forward, lambda t, p: reference_fgp(module, t, p)):
        module.zero_grad()
        (forward(text, tokens) * target).sum().backward()
        grads.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def numpy_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] -> [H, W], half-pixel centres, edge clamped (torch's align_corners=False)."""
    out = image
    for axis, new in enumerate(size):
        old = image.shape[axis]
        centre = np.maximum((np.arange(new) + 0.5) * old / new - 0.5, 0.0)
        low = np.minimum(np.floor(centre).astype(int), old - 1)
        high = np.minimum(low + 1, old - 1)
        frac = centre - low
        shape = [1, 1]
        shape[axis] = new
        out = np.take(out, low, axis=axis) * (1 - frac).reshape(shape) + np.take(out, high, axis=axis) * frac.reshape(
            shape
        )
    return out


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [((4, 4), (64, 64), 8.0), ((37, 37), (518, 518), 8.0), ((3, 5), (21, 30), 4.0), ((2, 2), (7, 9), 8.0)],
)
def test_smoothed_map_equals_resize_then_scipy_gaussian(grid, size, sigma):
    generator = torch.Generator().manual_seed(0)
    probabilities = [torch.rand(2, grid[0] * grid[1], 2, generator=generator).softmax(-1) for _ in range(3)]
    actual = utpa.smoothed_anomaly_map(probabilities, grid=grid, size=size, sigma=sigma)
    mean = torch.stack([p[..., utpa.ANOMALOUS_STATE] for p in probabilities]).mean(0).double().numpy()
    for index in range(2):
        upsampled = numpy_bilinear(mean[index].reshape(grid), size)
        expected = gaussian_filter(upsampled, sigma=sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(actual[index].numpy(), expected, atol=1e-6)


def test_smoothed_map_without_smoothing_is_the_upsampled_mean():
    probabilities = [torch.rand(1, 16, 2).softmax(-1) for _ in range(2)]
    actual = utpa.smoothed_anomaly_map(probabilities, grid=(4, 4), size=(32, 32), sigma=0.0)
    per_layer = [
        F.interpolate(p.transpose(1, 2).reshape(1, 2, 4, 4), size=(32, 32), mode="bilinear", align_corners=False)[:, 1]
        for p in probabilities
    ]
    torch.testing.assert_close(actual, torch.stack(per_layer).mean(0), rtol=1e-5, atol=1e-6)
