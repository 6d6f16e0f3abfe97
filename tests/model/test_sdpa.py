"""The frozen encoders' SDPA attention equals open_clip's own block forward (nn.MultiheadAttention).

Per block on the tiny backbone and on ViT-L/14-width blocks (vision: width 1024, 16 heads, 1,370 tokens = 518 px;
text: width 768, 12 heads, causal, 13 and 77 positions), per tower through `FrozenCLIP`, for LayerScale blocks,
and the fallback: blocks SDPA does not handle run open_clip's forward, and say so.
"""

from __future__ import annotations

import logging

import pytest
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import tokenize
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

from vip2clip.model.backbone import FrozenCLIP, block_forward, is_causal_mask, sdpa_unsupported
from vip2clip.model.weights import TINY_CLIP_CONFIG, load_clip

ATOL, RTOL = 2e-5, 1e-5


def causal(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


def random_blocks(width: int, heads: int, count: int, seed: int, **options) -> list[ResidualAttentionBlock]:
    """open_clip blocks with random weights, biases and layer norms (non-trivial everywhere)."""
    torch.manual_seed(seed)
    blocks = [ResidualAttentionBlock(width, heads, act_layer=QuickGELU, **options).eval() for _ in range(count)]
    for block in blocks:
        for name, parameter in block.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                parameter.data.normal_(1.0 if "ln_" in name and name.endswith("weight") else 0.0, 0.2)
    return [block.requires_grad_(False) for block in blocks]


def through_blocks(blocks, x, mask=None, sdpa=True):
    with torch.no_grad():
        for block in blocks:
            x = block_forward(block, x, mask=mask, causal=mask is not None) if sdpa else block(x, attn_mask=mask)
    return x


@pytest.fixture(scope="module")
def tiny_clip() -> FrozenCLIP:
    clip, _ = load_clip("tiny", None)
    return FrozenCLIP(clip, name="tiny")


def test_tiny_blocks_equal_open_clip(tiny_clip):
    x = torch.randn(2, 1 + 5 * 5, 64)
    for block in tiny_clip.clip.visual.transformer.resblocks:
        assert sdpa_unsupported(block) is None
        with torch.no_grad():
            torch.testing.assert_close(block_forward(block, x), block(x), atol=ATOL, rtol=RTOL)
    text = torch.randn(4, 13, 64)
    for block in tiny_clip.clip.transformer.resblocks:
        with torch.no_grad():
            expected = block(text, attn_mask=causal(13))
            torch.testing.assert_close(
                block_forward(block, text, mask=causal(13), causal=True), expected, atol=ATOL, rtol=RTOL
            )
            torch.testing.assert_close(block_forward(block, text, mask=causal(13)), expected, atol=ATOL, rtol=RTOL)


def test_vit_l_width_vision_blocks_at_518_px_equal_open_clip():
    blocks = random_blocks(width=1024, heads=16, count=2, seed=0)
    x = torch.randn(1, 1 + 37 * 37, 1024, generator=torch.Generator().manual_seed(1))
    expected = through_blocks(blocks, x, sdpa=False)
    actual = through_blocks(blocks, x)
    assert (actual - x).abs().mean() > 0.1, "the blocks hardly change x: the test would not see errors"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("length", [13, 77])
def test_vit_l_width_text_blocks_equal_open_clip(length):
    blocks = random_blocks(width=768, heads=12, count=2, seed=2)
    x = torch.randn(6, length, 768, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        through_blocks(blocks, x, causal(length)),
        through_blocks(blocks, x, causal(length), sdpa=False),
        atol=1e-4,
        rtol=1e-5,
    )


def test_layer_scale_blocks_are_supported():
    blocks = random_blocks(width=64, heads=4, count=2, seed=4, ls_init_value=0.5)
    assert all(sdpa_unsupported(block) is None for block in blocks)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(through_blocks(blocks, x), through_blocks(blocks, x, sdpa=False), atol=ATOL, rtol=RTOL)


def test_towers_equal_open_clip_forward(tiny_clip):
    images = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(5))
    tokens = tokenize(["X X X X X X X good X X X", "a photo of a damaged thing"])
    embeddings, eot = tiny_clip.embed_tokens(tokens), tokens.argmax(-1)
    assert tiny_clip.text_causal
    fast = tiny_clip.encode_image(images), tiny_clip.encode_prompts(embeddings, eot, n_positions=13)
    tiny_clip.sdpa = False
    try:
        slow = tiny_clip.encode_image(images), tiny_clip.encode_prompts(embeddings, eot, n_positions=13)
    finally:
        tiny_clip.sdpa = True
    for a, b in zip(fast[0].patch_tokens, slow[0].patch_tokens, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fast[0].global_feature, slow[0].global_feature, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fast[1], slow[1], atol=ATOL, rtol=RTOL)


def test_unsupported_blocks_fall_back_to_open_clip_and_say_which(caplog):
    config = {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "qk_norm": True}}
    torch.manual_seed(0)
    clip = CLIP(**config, quick_gelu=True).eval().requires_grad_(False)
    with caplog.at_level(logging.INFO, logger="vip2clip.model.backbone"):
        frozen = FrozenCLIP(clip, name="qk-norm")
    reason = sdpa_unsupported(clip.visual.transformer.resblocks[0])
    assert reason and "CustomResidualAttentionBlock" in reason
    assert "vision block 1 runs open_clip's own forward" in caplog.text and "text block" not in caplog.text
    images = torch.randn(1, 3, 64, 64)
    fast = frozen.encode_image(images)
    with torch.no_grad():  # the reference: every block's own forward
        visual = clip.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], 1)
        x = visual.ln_pre(x + frozen.positional_embedding((4, 4), device=x.device, dtype=x.dtype))
        for block in visual.transformer.resblocks:
            x = block(x)
    torch.testing.assert_close(fast.global_feature, torch.nn.functional.normalize(x[:, 0] @ visual.proj, dim=-1))


def test_causal_mask_detection():
    assert is_causal_mask(causal(77)) and not is_causal_mask(None)
    assert not is_causal_mask(torch.zeros(5, 5)) and not is_causal_mask(causal(4)[:3])


@pytest.mark.gpu
def test_cuda_sdpa_equals_open_clip_in_bf16():
    """On CUDA, SDPA picks flash / memory-efficient kernels: same result as open_clip's attention, within bf16."""
    blocks = [block.cuda() for block in random_blocks(width=1024, heads=16, count=2, seed=0)]
    x = torch.randn(2, 1 + 37 * 37, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(
            through_blocks(blocks, x), through_blocks(blocks, x, sdpa=False), atol=5e-2, rtol=2e-2
        )
    torch.testing.assert_close(through_blocks(blocks, x), through_blocks(blocks, x, sdpa=False), atol=1e-3, rtol=1e-4)
