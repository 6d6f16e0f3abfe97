"""`vip2clip.model.linear`: oneDNN's linear for CPU inference equals F.linear, and steps aside for autograd,
autocast and other dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from vip2clip.model import linear as fast


@pytest.mark.parametrize(
    ("x_shape", "transposed"), [((1, 1370, 1024), False), ((4, 13, 768), True), ((2, 64), False), ((3, 5, 64), True)]
)
def test_equals_f_linear(x_shape, transposed):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=generator)
    width = x_shape[-1]
    weight = (
        torch.randn(width, 96, generator=generator).T if transposed else torch.randn(96, width, generator=generator)
    )
    bias = torch.randn(96, generator=generator)
    with torch.no_grad():
        assert fast._onednn_applies(x, weight), "the fast path should be taken here"
        for b in (bias, None):
            expected = F.linear(x, weight, b)
            # Float rounding of sums of `width` products of order 1: relative to the output's scale.
            atol = 1e-6 * float(expected.abs().max())
            torch.testing.assert_close(fast.linear(x, weight, b), expected, atol=atol, rtol=0)


def test_autograd_autocast_and_other_dtypes_use_f_linear():
    x = torch.randn(2, 8, 16, requires_grad=True)
    weight, bias = torch.randn(4, 16), torch.randn(4)
    assert not fast._onednn_applies(x, weight)
    fast.linear(x, weight, bias).sum().backward()  # prompts are trained through the text encoder
    torch.testing.assert_close(x.grad, weight.sum(0).expand(2, 8, 16))
    with torch.no_grad():
        assert fast._onednn_applies(x, weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast._onednn_applies(x, weight)
            assert fast.linear(x, weight, bias).dtype == torch.bfloat16
        assert not fast._onednn_applies(x.double(), weight.double())


def test_mlp_fast_path_and_fallback():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, act_layer=QuickGELU).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.mlp(block.mlp, x), block.mlp(x), atol=1e-5, rtol=1e-5)
        other = nn.Sequential(nn.Linear(32, 8), nn.Tanh())  # not open_clip's MLP: its own forward
        torch.testing.assert_close(fast.mlp(other, x), other(x))
