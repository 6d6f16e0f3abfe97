"""create_model(clip_weights=file, checkpoint=release file).predict == an independent release re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.model import CLIP

import vip2clip
from vip2clip.model.weights import TINY_CLIP_CONFIG
from vip2clip.testing.release_checkpoint import random_release_checkpoint
from vip2clip.testing.release_reference import release_predict

D = TINY_CLIP_CONFIG["embed_dim"]


def random_clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A tiny CLIP's weights in OpenAI's key layout (open_clip keeps OpenAI's names), not the package's seed."""
    torch.manual_seed(seed)
    state = CLIP(**TINY_CLIP_CONFIG, quick_gelu=True).state_dict()
    # Larger, non-trivial layer norms and projections than the default init so that errors show.
    generator = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if key.endswith(("ln_post.weight", "ln_pre.weight", "ln_final.weight")):
            state[key] = 1 + 0.3 * torch.randn(value.shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    clip_state = random_clip_state_dict(seed=123)
    # larger weights than the release's defaults, and a small Meta-Net, so that a wrong computation shows
    checkpoint = random_release_checkpoint(clip_state["token_embedding.weight"], 7, std=0.1, weight_std=0.4, hidden=32)
    torch.save(clip_state, folder / "clip.pt")
    torch.save(checkpoint, folder / "release.pth")
    return folder, clip_state, checkpoint


@pytest.mark.parametrize("image_size", [96, 112])
def test_predict_matches_independent_release_implementation(release_files, image_size):
    folder, clip_state, checkpoint = release_files
    model = vip2clip.create_model(
        "tiny", clip_weights=folder / "clip.pt", checkpoint=folder / "release.pth", image_size=image_size, top_k=10
    )
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    ours = model.predict(images)
    layers = model.feature_layers
    ref_scores, ref_maps = release_predict(
        clip_state, checkpoint, images=images, layers=layers, vision_heads=2, text_heads=2, top_k=10, sigma=8.0
    )
    assert ours.pred_score.shape == (2,) and ours.anomaly_map.shape == (2, image_size, image_size)
    assert ref_maps.std() > 1e-3, "the reference maps are flat: the test would not see errors"
    assert np.abs(ref_scores - 0.5).max() > 1e-3, "the reference scores are all 0.5: the test would not see errors"
    np.testing.assert_allclose(ours.pred_score.numpy(), ref_scores, atol=1e-5)
    np.testing.assert_allclose(ours.anomaly_map.numpy(), ref_maps, rtol=1e-4, atol=1e-6)


def test_released_quirk_is_reproduced_and_differs_from_paper_prompts(release_files):
    """Both released prompt sentences say "damaged"; a fresh model's normal prompt says "good"."""
    folder, _clip_state, _checkpoint = release_files
    released = vip2clip.create_model("tiny", clip_weights=folder / "clip.pt", checkpoint=folder / "release.pth")
    torch.testing.assert_close(released.prompts.tokens_normal, released.prompts.tokens_anomalous)
    fresh = vip2clip.create_model("tiny", clip_weights=folder / "clip.pt")
    assert not torch.equal(fresh.prompts.tokens_normal, fresh.prompts.tokens_anomalous)
    torch.testing.assert_close(fresh.prompts.state_anomalous, released.prompts.state_anomalous)
