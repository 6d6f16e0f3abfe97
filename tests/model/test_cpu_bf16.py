"""bf16 on the CPU as its own path: the encoders' products, attention and activations in bf16 on kept weight copies
(not autocast), the fused MLP activation, the CPU capability detection and what the log and `vip2clip info` say."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

import vip2clip
from vip2clip import factory
from vip2clip.cli import main
from vip2clip.model import linear as fast
from vip2clip.utils.cpu_features import CpuFeatures, cpu_features

NATIVE_BF16 = cpu_features().bf16
BF16_TOLERANCE = 3e-2  # relative to the output scale: bf16 keeps 8 significant bits


def test_cpu_features_reads_the_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    features = cpu_features(cpuinfo)
    assert (features.model, features.bf16, features.int8) == ("Some Xeon", True, True)
    assert "native (AVX512-BF16)" in features.describe_bf16()
    old_cpuinfo = tmp_path / "old_cpuinfo"  # (cpu_features caches per file)
    old_cpuinfo.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu avx2\n")
    old = cpu_features(old_cpuinfo)
    assert not old.bf16 and not old.int8
    assert "emulated, slower than fp32" in old.describe_bf16() and "no VNNI" in old.describe_int8()
    missing = cpu_features(tmp_path / "absent")
    assert not missing.known and "unknown" in missing.describe_bf16()


@pytest.mark.parametrize("activation", [QuickGELU(), nn.GELU(), nn.GELU(approximate="tanh")])
def test_fused_bf16_mlp_matches_the_fp32_mlp(activation):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4, act_layer=type(activation)).eval()
    block.mlp.gelu = activation
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        expected = block.mlp(x)
        low = fast.mlp(block.mlp, x.bfloat16())
    assert low.dtype == torch.bfloat16
    error = (low.float() - expected).abs().max().item()
    assert error <= BF16_TOLERANCE * expected.abs().max().item()


def test_low_precision_copies_follow_weight_changes():
    weight, bias = torch.randn(8, 16), torch.randn(8)
    x = torch.randn(3, 16).bfloat16()
    with torch.no_grad():
        before = fast.linear(x, weight, bias)
        assert fast.low_precision_copy(weight, torch.bfloat16) is fast.low_precision_copy(weight, torch.bfloat16)
        weight.mul_(-1)  # an in-place change must not leave a stale bf16 copy behind
        after = fast.linear(x, weight, bias)
    expected = F.linear(x.float(), weight, bias)
    assert (after.float() - expected).abs().max() <= BF16_TOLERANCE * expected.abs().max()
    assert not torch.allclose(before, after)


def test_bf16_encoders_run_bf16_products_outside_autocast(tiny_images, monkeypatch):
    model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4, precision="bf16")
    seen = []
    original = fast.linear

    def spy(x, weight, bias=None):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return original(x, weight, bias)

    monkeypatch.setattr("vip2clip.model.backbone.linear", spy)
    prediction = model.predict(tiny_images)
    assert prediction.anomaly_map.dtype == torch.float32 and torch.isfinite(prediction.anomaly_map).all()
    assert (torch.bfloat16, False) in seen, "the blocks' products should run in bf16 without autocast"
    model.set_precision("fp32")
    assert model.backbone.compute_dtype is None


def test_bf16_logs_where_it_runs_and_warns_without_native_bf16(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vip2clip.factory")
    vip2clip.create_model("tiny", image_size=64, precision="bf16")
    assert "linear layers, attention and activations in bf16" in caplog.text
    caplog.clear()
    old = CpuFeatures("Old CPU", frozenset({"avx2"}), known=True)
    monkeypatch.setattr(factory, "cpu_features", lambda: old)
    vip2clip.create_model("tiny", image_size=64, precision="bf16")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not native" in message and "fp32 is faster here" in message for message in warnings)


def test_info_reports_precision_and_cpu(capsys):
    assert main(["info", "--backbone", "tiny", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "precision: bf16 (bf16 encoders on the CPU" in out
    assert f"cpu: {cpu_features().describe()}" in out
    if NATIVE_BF16:
        assert "bf16: native" in out
