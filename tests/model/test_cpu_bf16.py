"""bf16 on the CPU as its own path: the encoders' products, attention and activations in bf16 on kept weight copies
(not autocast), the fused MLP activation, the CPU capability detection (and the switch that hides capabilities),
what `precision="auto"` picks per CPU class, and what the log and `vip2clip info` say.

Every assertion holds on every CPU class (AVX2 only, AVX-512, AVX512-BF16, AMX): what depends on the capability
is asserted on a monkeypatched CpuFeatures of each class, and the machine's own class only where both branches
are asserted."""

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
from vip2clip.model.vip2clip import resolve_precision
from vip2clip.utils import cpu_features as features_module
from vip2clip.utils.cpu_features import FEATURES_OFF_VARIABLE, CpuFeatures, auto_precision, cpu_features

NATIVE_BF16 = cpu_features().bf16
BF16_TOLERANCE = 3e-2  # relative to the output scale: bf16 keeps 8 significant bits
# The CPU classes this project runs on, as the kernel reports them.
AVX2_ONLY = CpuFeatures("AMD EPYC (Zen 3)", frozenset({"avx2", "fma"}), known=True)
ZEN4 = CpuFeatures("AMD EPYC (Zen 4)", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}), known=True)
AMX = CpuFeatures("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}), known=True)
UNKNOWN = CpuFeatures("arm64", frozenset(), known=False)


@pytest.fixture(autouse=True)
def _no_forced_features(monkeypatch):
    """These tests set the switch themselves (a suite run with it set must not change what they expect)."""
    monkeypatch.delenv(FEATURES_OFF_VARIABLE, raising=False)


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


def test_the_switch_hides_capabilities(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni amx_bf16\n")
    assert (cpu_features(cpuinfo).bf16, cpu_features(cpuinfo).int8, cpu_features(cpuinfo).avx512) == (True,) * 3
    monkeypatch.setenv(FEATURES_OFF_VARIABLE, "bf16, int8")
    hidden = cpu_features(cpuinfo)
    assert (hidden.bf16, hidden.int8, hidden.avx512) == (False, False, True)
    assert f"{FEATURES_OFF_VARIABLE} hides it" in hidden.describe_bf16()
    monkeypatch.setenv(FEATURES_OFF_VARIABLE, "bf16,int8,avx512")
    avx2_only = cpu_features(cpuinfo)
    assert not avx2_only.avx512 and not any(flag.startswith("avx512") for flag in avx2_only.flags)
    assert "avx2" in avx2_only.flags and "AVX2" in avx2_only.describe()
    monkeypatch.setenv(FEATURES_OFF_VARIABLE, "avx1024")
    with pytest.raises(ValueError, match=f"{FEATURES_OFF_VARIABLE}: unknown capability avx1024"):
        cpu_features(cpuinfo)


@pytest.mark.parametrize(
    ("features", "expected"), [(AVX2_ONLY, "fp32"), (ZEN4, "bf16"), (AMX, "bf16"), (UNKNOWN, "fp32")]
)
def test_auto_is_bf16_only_where_native(features, expected, monkeypatch):
    precision, why = auto_precision("cpu", features)
    assert precision == expected and why.startswith(f"auto: {expected}")
    assert ("native" in why) == features.known
    monkeypatch.setattr(features_module, "cpu_features", lambda: features)
    assert resolve_precision("auto", "cpu") == (precision, why)
    assert resolve_precision("fp32", "cpu") == ("fp32", "fp32 as asked")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int4", "cpu")


def test_auto_on_a_model_says_what_it_chose(monkeypatch):
    for features, expected in ((AVX2_ONLY, "fp32"), (ZEN4, "bf16")):
        monkeypatch.setattr(features_module, "cpu_features", lambda features=features: features)
        model = vip2clip.create_model("tiny", image_size=64, precision="auto")
        assert model.precision == expected and model.backbone.compute_dtype == (
            torch.bfloat16 if expected == "bf16" else None
        )
        assert f"auto: {expected}" in model.describe_precision()


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
        before = fast.linear(x, weight, bias=bias)
        assert fast.low_precision_copy(weight, torch.bfloat16) is fast.low_precision_copy(weight, torch.bfloat16)
        weight.mul_(-1)  # an in-place change must not leave a stale bf16 copy behind
        after = fast.linear(x, weight, bias=bias)
    expected = F.linear(x.float(), weight, bias)
    assert (after.float() - expected).abs().max() <= BF16_TOLERANCE * expected.abs().max()
    assert not torch.allclose(before, after)


def test_bf16_encoders_run_bf16_products_outside_autocast(tiny_images, monkeypatch):
    model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4, precision="bf16")
    seen = []
    original = fast.linear

    def spy(x, weight, *, bias=None):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return original(x, weight, bias=bias)

    monkeypatch.setattr("vip2clip.model.backbone.linear", spy)
    prediction = model.predict(tiny_images)
    assert prediction.anomaly_map.dtype == torch.float32 and torch.isfinite(prediction.anomaly_map).all()
    assert (torch.bfloat16, False) in seen, "the blocks' products should run in bf16 without autocast"
    model.set_precision("fp32")
    assert model.backbone.compute_dtype is None


@pytest.mark.parametrize("features", [AVX2_ONLY, ZEN4, AMX], ids=["avx2", "zen4", "amx"])
def test_bf16_logs_where_it_runs_and_warns_without_native_bf16(features, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vip2clip.factory")
    monkeypatch.setattr(factory, "cpu_features", lambda: features)
    vip2clip.create_model("tiny", image_size=64, precision="bf16")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    slower = any("not native" in message and "fp32 is faster here" in message for message in warnings)
    assert slower == (not features.bf16)
    assert ("linear layers, attention and activations in bf16" in caplog.text) == features.bf16


def test_info_reports_precision_and_cpu(capsys):
    assert main(["info", "--backbone", "tiny", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "precision: bf16 (bf16 encoders on the CPU" in out
    assert f"cpu: {cpu_features().describe()}" in out
    if NATIVE_BF16:
        assert "bf16: native" in out


@pytest.mark.parametrize(
    ("command", "default"),
    [
        *[(command, "auto") for command in ("predict", "calibrate", "serve", "export", "info")],
        *[(command, "fp32") for command in ("test", "benchmark", "study", "train")],
    ],
)
def test_precision_defaults_per_command(command, default, capsys):
    """Deploying commands default to auto; the ones that measure keep fp32, the reference of the paper's tables."""
    with pytest.raises(SystemExit):
        main([command, "--help"] if command != "study" else [command, "modules", "--help"])
    assert f"(default {default})" in " ".join(capsys.readouterr().out.split())


def test_export_writes_fp32_and_refuses_a_torch_precision(capsys, tmp_path):
    args = ["export", "--backbone", "tiny", "--image-size", "64", "--out", str(tmp_path / "m.onnx")]
    assert main([*args, "--precision", "bf16"]) == 2
    assert "the runtime chooses the precision when the file runs" in capsys.readouterr().err
