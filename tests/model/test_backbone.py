"""Frozen open_clip backbone: weights sources, positional grid, layer taps, prompt-embedding text forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import tokenize

from vip2clip.model.backbone import FrozenCLIP, default_feature_layers, resize_positional_embedding
from vip2clip.model.weights import TINY_CLIP_CONFIG, WeightsError, load_clip, read_state_dict


@pytest.fixture(scope="module")
def tiny_clip():
    clip, _ = load_clip("tiny", None)
    return FrozenCLIP(clip, name="tiny")


def test_default_layers_are_the_quarter_depth_blocks():
    assert default_feature_layers(24) == (6, 12, 18, 24)
    assert default_feature_layers(12) == (3, 6, 9, 12)
    assert default_feature_layers(4) == (1, 2, 3, 4)


def test_random_init_is_seeded_and_frozen():
    first, source = load_clip("tiny", None)
    second, _ = load_clip("tiny", None)
    assert "random" in source
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in first.parameters())
    assert not first.training


def test_image_features_shapes_and_norms(tiny_clip):
    features = tiny_clip.encode_image(torch.randn(2, 3, 96, 80))
    assert features.grid == (6, 5)
    assert len(features.patch_tokens) == 4
    for tokens in features.patch_tokens:
        assert tokens.shape == (2, 30, 64)
        torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 30))
    assert features.global_feature.shape == (2, 64)


def test_native_grid_matches_open_clip_encode_image(tiny_clip):
    """At the native size our block loop is open_clip's forward; the global feature skips ln_post."""
    clip = tiny_clip.clip
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pooled = clip.encode_image(images, normalize=True)  # open_clip: ln_post(cls) @ proj
        visual = clip.visual
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
        x = visual.transformer(visual.ln_pre(x))
    features = tiny_clip.encode_image(images)
    torch.testing.assert_close(features.global_feature, F.normalize(x[:, 0] @ visual.proj, dim=-1))
    last = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1)
    torch.testing.assert_close(features.patch_tokens[-1], last)
    assert not torch.allclose(features.global_feature, pooled, atol=1e-3)


def test_positional_grid_resize_keeps_class_position():
    pos = torch.randn(1 + 24 * 24, 8)
    resized = resize_positional_embedding(pos, (37, 37))
    assert resized.shape == (1 + 37 * 37, 8)
    torch.testing.assert_close(resized[0], pos[0])
    expected = F.interpolate(pos[1:].T.reshape(1, 8, 24, 24), size=(37, 37), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized[1:], expected.reshape(8, -1).T)
    assert resize_positional_embedding(pos, (24, 24)) is pos


def test_positional_cache_is_reused(tiny_clip):
    first = tiny_clip.positional_embedding((5, 5), device=torch.device("cpu"), dtype=torch.float32)
    assert tiny_clip.positional_embedding((5, 5), device=torch.device("cpu"), dtype=torch.float32) is first


def _prompt_embeddings(tiny_clip, texts):
    tokens = tokenize(texts)
    return tiny_clip.embed_tokens(tokens), tokens.argmax(-1)


def test_prompt_embedding_forward_equals_open_clip_encode_text(tiny_clip):
    texts = ["a photo of a damaged thing", "X X good X"]
    embeddings, eot = _prompt_embeddings(tiny_clip, texts)
    ours = tiny_clip.encode_prompts(embeddings, eot)
    with torch.no_grad():
        reference = tiny_clip.clip.encode_text(tokenize(texts), normalize=True)
    torch.testing.assert_close(ours, reference)


def test_truncated_text_forward_equals_full_77_tokens(tiny_clip):
    embeddings, eot = _prompt_embeddings(tiny_clip, ["X X X X X X X good X X X", "X X X X X X X damaged X X X"])
    embeddings = embeddings + 0.05 * torch.randn_like(embeddings)  # learnable-prompt-like perturbation
    full = tiny_clip.encode_prompts(embeddings, eot)
    truncated = tiny_clip.encode_prompts(embeddings, eot, n_positions=int(eot.max()) + 1)
    assert int(eot.max()) + 1 == 13
    torch.testing.assert_close(truncated, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="end-of-text"):
        tiny_clip.encode_prompts(embeddings, eot, n_positions=5)


@pytest.mark.slow
def test_weights_from_openai_state_dict_and_torchscript_file(tmp_path):
    torch.manual_seed(42)
    source = CLIP(**TINY_CLIP_CONFIG, quick_gelu=True).eval()
    state = source.state_dict()
    torch.save({**{f"module.{k}": v for k, v in state.items()}}, tmp_path / "prefixed.pt")
    loaded, description = load_clip("tiny", tmp_path / "prefixed.pt")
    assert str(tmp_path / "prefixed.pt") in description
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key])

    # OpenAI's releases are TorchScript archives whose state dict carries metadata entries.
    source.register_buffer("input_resolution", torch.tensor(224))
    example = (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long))
    torch.jit.save(torch.jit.trace(source, example, check_trace=False, strict=False), str(tmp_path / "openai.pt"))
    loaded, _ = load_clip("tiny", tmp_path / "openai.pt")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert "input_resolution" not in read_state_dict(tmp_path / "openai.pt")


@pytest.mark.parametrize(
    ("backbone", "weights", "message"),
    [
        ("tiny", "/no/such/ViT-L-14-336px.pt", "not found"),
        ("ViT-B-16", "not_a_tag", "tags: "),
        ("RN50", None, "not a plain ViT"),
        ("ViT-Nonexistent", None, "unknown backbone"),
    ],
)
def test_clear_errors(backbone, weights, message):
    with pytest.raises((WeightsError, ValueError), match=message):
        load_clip(backbone, weights)


def test_wrong_architecture_file_is_named(tmp_path):
    torch.manual_seed(0)
    config = {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "layers": 2}}
    torch.save(CLIP(**config).state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"other\.pt.*missing"):
        load_clip("tiny", tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage"):
        load_clip("tiny", tmp_path / "garbage.pt")
