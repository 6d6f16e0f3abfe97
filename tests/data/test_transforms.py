"""data.transforms: the numpy map resizer equals torch's bilinear interpolation (the torch-free engines use it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vip2clip.data.transforms import resize_map


@pytest.mark.parametrize(
    ("shape", "size"), [((518, 518), (4000, 3000)), ((518, 518), (90, 50)), ((37, 37), (518, 517)), ((3, 5), (2000, 1))]
)
def test_resize_map_equals_torch_bilinear(shape, size):
    values = np.random.default_rng(0).random(shape, dtype=np.float32)
    width, height = size
    expected = F.interpolate(
        torch.from_numpy(values)[None, None], size=(height, width), mode="bilinear", align_corners=False
    )
    actual = resize_map(values, size)
    assert actual.shape == (height, width) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected[0, 0].numpy(), atol=1e-6, rtol=0)
    assert resize_map(values.astype(np.float64), shape[::-1]).dtype == np.float32
