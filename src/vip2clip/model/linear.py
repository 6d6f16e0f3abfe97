"""`linear`: F.linear for the frozen encoders' inference, through oneDNN on CPUs.

PyTorch's CPU `F.linear` in float32 calls MKL's sgemm, which runs far below the hardware on AMD CPUs: on this
project's 2-core AMD EPYC (AVX-512), a ViT-L/14 MLP product [1370, 1024] x [1024, 4096] ran at 42 GFLOP/s through
F.linear and at 74 through oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op torch.compile's CPU
backend uses), which takes the same unpacked weight: no copy is kept, the result equals F.linear to float rounding.
ONNX Runtime's MLAS ran the same product at 80 GFLOP/s.

Used only where it cannot change what the caller gets: float32 CPU tensors, no autograd (the text encoder trains
prompts through it), no autocast, and not while torch.export or torch.compile trace (the ONNX exporter has no
translation for it). Checked once against F.linear; any failure means F.linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., in], weight [out, in], bias [out]) -> [..., out], through oneDNN when that is safe."""
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's block MLP, Sequential(c_fc Linear, activation, c_proj Linear), with `linear`; any other
    module runs its own forward."""
    fc, activation, proj = (getattr(module, name, None) for name in ("c_fc", "gelu", "c_proj"))
    if not (type(module) is nn.Sequential and len(module) == 3 and type(fc) is nn.Linear and type(proj) is nn.Linear):
        return module(x)
    return linear(activation(linear(x, fc.weight, fc.bias)), proj.weight, proj.bias)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if _cpu_autocast() or torch.compiler.is_compiling():
        return False
    return _onednn_works()


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


@functools.cache
def _onednn_works() -> bool:
    """This torch build has oneDNN's linear and it agrees with F.linear on a small product."""
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((2, 3, 16), (8, 16), (8,)))
        fast = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return torch.allclose(fast, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
