"""`linear`: F.linear for the frozen encoders' inference, through oneDNN on CPUs where that is faster.

PyTorch's CPU `F.linear` in float32 calls MKL's sgemm, which runs far below the hardware on AMD CPUs with AVX-512:
on this project's 2-core AMD EPYC Zen 4, a ViT-L/14 MLP product [1370, 1024] x [1024, 4096] ran at 42 GFLOP/s
through F.linear and at 74 through oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op torch.compile's
CPU backend uses), which takes the same unpacked weight: no copy is kept, the result equals F.linear to float
rounding. On an AVX2-only AMD EPYC Zen 3 it is the other way round (oneDNN 102-113 GFLOP/s, MKL 113-121), so the
library is chosen by capability (`fp32_library`): oneDNN with AVX-512, MKL without; VIP2CLIP_FP32_LINEAR=onednn or
mkl overrides the choice (to measure both on a new CPU class: benchmarks/bench_engines.py).

Used only where it cannot change what the caller gets: float32 CPU tensors, no autograd (the text encoder trains
prompts through it), no autocast, and not while torch.export or torch.compile trace (the ONNX exporter has no
translation for it). Checked once against F.linear; any failure means F.linear.

bf16 inputs (the encoders' bf16 path, `FrozenCLIP.compute_dtype`) with float32 weights run F.linear in bf16 on a
bf16 copy of the frozen weight made once and kept while the weight lives and is unchanged: casting the weight on
every call, as autocast does, cost a third of the product's time for a ViT-L MLP product on a CPU with AMX.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from vip2clip.utils.cpu_features import cpu_features

# weight -> (its version counter when copied, {(dtype, scale): copy}): low-precision copies of frozen weights.
_LOW_PRECISION_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()
QUICK_GELU_SCALE = 1.702  # open_clip's QuickGELU: x * sigmoid(1.702 x) = swish(1.702 x) / 1.702
FP32_LINEAR_VARIABLE = "VIP2CLIP_FP32_LINEAR"
FP32_LIBRARIES = ("onednn", "mkl")
LIBRARY_NAMES = {"onednn": "oneDNN", "mkl": "MKL (F.linear)"}


def linear(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., in], weight [out, in], bias [out]) -> [..., out], through oneDNN when that is safe.

    x in bf16/fp16 with fp32 weights (the encoders' low-precision path): the product runs in x's dtype on kept
    copies of the weights, and the result is in x's dtype."""
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if _low_precision_applies(x, weight):
        return F.linear(x, low_precision_copy(weight, x.dtype), low_precision_copy(bias, x.dtype))
    return F.linear(x, weight, bias)


def low_precision_copy(tensor: torch.Tensor | None, dtype: torch.dtype, *, scale: float = 1.0) -> torch.Tensor | None:
    """`tensor * scale` in `dtype`: for a frozen tensor a copy kept while the tensor lives and is unchanged (its
    version counter), else a plain cast (autograd then flows to it)."""
    if tensor is None:
        return None
    if tensor.requires_grad or torch.compiler.is_compiling():
        return (tensor * scale if scale != 1.0 else tensor).to(dtype)
    version, copies = _LOW_PRECISION_COPIES.get(tensor, (None, {}))
    if version != tensor._version:
        copies = {}
        _LOW_PRECISION_COPIES[tensor] = (tensor._version, copies)
    if (dtype, scale) not in copies:
        copies[(dtype, scale)] = (tensor.detach() * scale if scale != 1.0 else tensor.detach()).to(dtype)
    return copies[(dtype, scale)]


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's block MLP, Sequential(c_fc Linear, activation, c_proj Linear), with `linear`; any other
    module runs its own forward. In bf16 on the CPU, the activation (GELU, QuickGELU) is fused into the first
    product as a oneDNN post-op: the bf16 activation alone took as long as the product."""
    fc, activation, proj = (getattr(module, name, None) for name in ("c_fc", "gelu", "c_proj"))
    if not (type(module) is nn.Sequential and len(module) == 3 and type(fc) is nn.Linear and type(proj) is nn.Linear):
        return module(x)
    fusion = _fused_activation(activation)
    if fusion is not None and _low_precision_applies(x, fc.weight) and _fusion_works(x.dtype):
        attr, algorithm, scale = fusion
        w1, b1 = (low_precision_copy(t, x.dtype, scale=scale) for t in (fc.weight, fc.bias))
        hidden = torch.ops.mkldnn._linear_pointwise(x, w1, b1, attr, [], algorithm)
        # QuickGELU's 1/1.702 goes into the second product's weight (its bias stays).
        w2, b2 = low_precision_copy(proj.weight, x.dtype, scale=1.0 / scale), low_precision_copy(proj.bias, x.dtype)
        return torch.ops.mkldnn._linear_pointwise(hidden, w2, b2, "none", [], "")
    return linear(activation(linear(x, fc.weight, bias=fc.bias)), proj.weight, bias=proj.bias)


def _fused_activation(activation: nn.Module | None) -> tuple[str, str, float] | None:
    """(oneDNN post-op, its algorithm, input scale) computing `activation`, or None."""
    if type(activation) is QuickGELU:
        return "swish", "", QUICK_GELU_SCALE
    if type(activation) is nn.GELU:
        return "gelu", activation.approximate, 1.0
    return None


def _low_precision_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not _cpu_autocast()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
    )


@functools.cache
def _fusion_works(dtype: torch.dtype) -> bool:
    """oneDNN's linear with a swish post-op runs in `dtype` here and agrees with the unfused product."""
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(*shape, generator=generator).to(dtype) for shape in ((5, 16), (8, 16), (8,)))
        fused = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "swish", [], "").float()
        plain = F.linear(x.float(), weight.float(), bias.float())
        return torch.allclose(fused, F.silu(plain), atol=5e-2, rtol=5e-2)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if _cpu_autocast() or torch.compiler.is_compiling():
        return False
    return fp32_library()[0] == "onednn"


@functools.cache
def fp32_library() -> tuple[str, str]:
    """("onednn" | "mkl", why): the library of the frozen encoders' fp32 CPU products in this process."""
    forced = os.environ.get(FP32_LINEAR_VARIABLE, "").strip().lower()
    if forced and forced not in FP32_LIBRARIES:
        raise ValueError(f"{FP32_LINEAR_VARIABLE}={forced!r}: use one of {', '.join(FP32_LIBRARIES)}")
    if not _onednn_works():
        return "mkl", "fp32 products: MKL (F.linear; this torch has no working oneDNN linear)"
    if forced:
        return forced, f"fp32 products: {LIBRARY_NAMES[forced]} ({FP32_LINEAR_VARIABLE})"
    if cpu_features().avx512:
        return "onednn", "fp32 products: oneDNN (faster than MKL on AVX-512 CPUs)"
    return "mkl", "fp32 products: MKL (F.linear; faster than oneDNN without AVX-512)"


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
