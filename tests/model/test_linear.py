"""`vip2clip.model.linear`: oneDNN's linear for CPU inference equals F.linear to float rounding, is chosen per CPU
class (oneDNN with AVX-512, MKL without, or as VIP2CLIP_FP32_LINEAR says), and steps aside for autograd, autocast
and other dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from vip2clip.model import linear as fast
from vip2clip.utils import cpu_features as features_module
from vip2clip.utils.cpu_features import CpuFeatures

FLOAT32_UNIT_ROUNDOFF = 2.0**-24


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN chosen for fp32 products whatever this CPU's class (the path under test)."""
    monkeypatch.setattr(fast, "fp32_library", lambda: ("onednn", "forced by the test"))


def rounding_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """How far two fp32 evaluations of x @ weight.T + bias may differ per element, whatever order each sums in:
    each is within K u sum|x_k w_k| (+ u |b|) of the exact value (Higham's bound for a K-term dot product, u the
    unit roundoff), so they are within twice that of each other."""
    magnitude = F.linear(x.abs().double(), weight.abs().double(), None if bias is None else bias.abs().double())
    return (2 * (x.shape[-1] + 1) * FLOAT32_UNIT_ROUNDOFF * magnitude).float()


@pytest.mark.parametrize(
    ("x_shape", "transposed"), [((1, 1370, 1024), False), ((4, 13, 768), True), ((2, 64), False), ((3, 5, 64), True)]
)
def test_equals_f_linear(x_shape, transposed, onednn):
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
            expected, got = F.linear(x, weight, b), fast.linear(x, weight, bias=b)
            error = (got - expected).abs()
            assert (error <= rounding_bound(x, weight, b)).all(), f"greatest difference {error.max():.2e}"
            # The bound is far above what either library's rounding gives, yet far below a wrong product's error.
            assert (rounding_bound(x, weight, b) < 0.05 * expected.abs().max()).all()


@pytest.mark.parametrize(
    ("features", "library"),
    [
        (CpuFeatures("Zen 3", frozenset({"avx2", "fma"}), True), "mkl"),
        (CpuFeatures("Zen 4", frozenset({"avx2", "avx512f", "avx512_bf16"}), True), "onednn"),
        (CpuFeatures("Xeon", frozenset({"avx2", "avx512f", "amx_bf16"}), True), "onednn"),
        (CpuFeatures("unknown", frozenset(), False), "mkl"),
    ],
)
def test_fp32_library_by_cpu_class_and_switch(features, library, monkeypatch):
    monkeypatch.delenv(fast.FP32_LINEAR_VARIABLE, raising=False)
    monkeypatch.setattr(features_module, "cpu_features", lambda: features)
    monkeypatch.setattr(fast, "cpu_features", lambda: features)
    fast.fp32_library.cache_clear()
    try:
        assert fast.fp32_library()[0] == library
        x, weight = torch.randn(2, 16), torch.randn(4, 16)
        with torch.no_grad():
            assert fast._onednn_applies(x, weight) == (library == "onednn")
        for forced in fast.FP32_LIBRARIES:
            monkeypatch.setenv(fast.FP32_LINEAR_VARIABLE, forced)
            fast.fp32_library.cache_clear()
            assert fast.fp32_library() == (
                forced,
                f"fp32 products: {fast.LIBRARY_NAMES[forced]} (VIP2CLIP_FP32_LINEAR)",
            )
        monkeypatch.setenv(fast.FP32_LINEAR_VARIABLE, "blas")
        fast.fp32_library.cache_clear()
        with pytest.raises(ValueError, match="VIP2CLIP_FP32_LINEAR='blas'"):
            fast.fp32_library()
    finally:
        monkeypatch.undo()
        fast.fp32_library.cache_clear()


def test_autograd_autocast_and_other_dtypes_use_f_linear(onednn):
    x = torch.randn(2, 8, 16, requires_grad=True)
    weight, bias = torch.randn(4, 16), torch.randn(4)
    assert not fast._onednn_applies(x, weight)
    fast.linear(x, weight, bias=bias).sum().backward()  # prompts are trained through the text encoder
    torch.testing.assert_close(x.grad, weight.sum(0).expand(2, 8, 16))
    with torch.no_grad():
        assert fast._onednn_applies(x, weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast._onednn_applies(x, weight)
            assert fast.linear(x, weight, bias=bias).dtype == torch.bfloat16
        assert not fast._onednn_applies(x.double(), weight.double())


@pytest.mark.parametrize("library", fast.FP32_LIBRARIES)
def test_mlp_fast_path_and_fallback(library, monkeypatch):
    monkeypatch.setattr(fast, "fp32_library", lambda: (library, "forced by the test"))
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, act_layer=QuickGELU).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.mlp(block.mlp, x), block.mlp(x), atol=1e-5, rtol=1e-5)
        other = nn.Sequential(nn.Linear(32, 8), nn.Tanh())  # not open_clip's MLP: its own forward
        torch.testing.assert_close(fast.mlp(other, x), other(x))
