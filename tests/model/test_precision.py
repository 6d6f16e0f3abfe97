"""Reduced precision: autocast (bf16/fp16) of the frozen encoders stays within 1e-2 of fp32 on the same inputs.

CPU tests use the tiny backbone and a 2-block model of ViT-L/14's widths (1024-wide vision, 768-wide text,
patch 14), so that the error of the full-width matrix products is exercised without a 300 M-parameter
model. GPU tests (marked `gpu`) repeat the check on CUDA and check the compiled encoders.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP

import vip2clip
from vip2clip.config import ModelConfig
from vip2clip.model.backbone import FrozenCLIP
from vip2clip.model.vip2clip import ViP2CLIP

TOLERANCE = 1e-2
# ViT-L/14's widths with 2 blocks per tower: what ViT-L-14-336 computes per block, at a fraction of the cost.
VIT_L_WIDTH_2_BLOCKS = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 56, "layers": 2, "width": 1024, "head_width": 64, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 2},
}
VIT_L_SIZE = 56  # 4x4 patch grid: bf16 matrix products are slow on CPUs without native bf16


def vit_l_width_model(seed: int = 0) -> ViP2CLIP:
    """ViP²-CLIP on a seeded random 2-block CLIP of ViT-L/14's widths."""
    torch.manual_seed(seed)
    clip = CLIP(**VIT_L_WIDTH_2_BLOCKS, quick_gelu=True).eval().requires_grad_(False)
    backbone = FrozenCLIP(clip, feature_layers=(1, 2), name="vit-l-width-2-blocks")
    return ViP2CLIP(backbone, ModelConfig(backbone="vit-l-width-2-blocks", image_size=VIT_L_SIZE, top_k=8)).eval()


@pytest.fixture(scope="module")
def vit_l_width() -> ViP2CLIP:
    return vit_l_width_model()


def random_images(batch: int, size: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch + size)).to(device)


def outputs(model: ViP2CLIP, images: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """Every fp32 quantity a precision change could disturb: cosine similarities, text features, scores, maps.

    With random weights the scores and maps are nearly constant (they hardly react to any error), so the
    cosine similarities [B, HW, 2] per layer and the text features [B, 2, D] carry the real check.
    """
    model.set_precision(precision)
    try:
        with torch.no_grad():
            output = model(images)
        prediction = model.predict(images)
    finally:
        model.set_precision("fp32")
    return {
        "similarities": torch.stack(output.similarities),
        "text": output.text,
        "image_logits": output.image_logits * model.config.temperature,
        "pred_score": prediction.pred_score,
        "anomaly_map": prediction.anomaly_map,
    }


def assert_close_to_fp32(model: ViP2CLIP, images: torch.Tensor, precision: str) -> None:
    exact = outputs(model, images, "fp32")
    low = outputs(model, images, precision)
    for name, value in low.items():
        assert value.dtype == torch.float32, f"{name} comes back as {value.dtype} under {precision}"
        error = (value - exact[name]).abs().max().item()
        assert error <= TOLERANCE, f"{precision} {name} differs from fp32 by {error:.3g}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_autocast_matches_fp32(tiny_model, tiny_images, precision):
    assert_close_to_fp32(tiny_model, tiny_images, precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vit_l_width_autocast_matches_fp32(vit_l_width, precision):
    assert_close_to_fp32(vit_l_width, random_images(2, VIT_L_SIZE), precision)


def test_autocast_really_lowers_the_encoder_precision(tiny_model, tiny_images):
    """Guards the tests above: if autocast were ignored, 'within 1e-2' would hold trivially."""
    exact = tiny_model.encode_image(tiny_images)
    try:
        low = tiny_model.set_precision("bf16").encode_image(tiny_images)
    finally:
        tiny_model.set_precision("fp32")
    assert low.patch_tokens[0].dtype == torch.float32  # handed back in fp32 ...
    assert not torch.equal(low.patch_tokens[0], exact.patch_tokens[0])  # ... but computed in bf16


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_matches_fp32(precision):
    model = vit_l_width_model().to("cuda")
    assert_close_to_fp32(model, random_images(4, VIT_L_SIZE, "cuda"), precision)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_compiled_encoders_match_eager():
    model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4, device="cuda")
    images = random_images(2, 64, "cuda")
    eager = model.predict(images)
    compiled = model.compile_encoders().predict(images)
    torch.testing.assert_close(compiled.pred_score, eager.pred_score, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled.anomaly_map, eager.anomaly_map, atol=1e-4, rtol=1e-4)
