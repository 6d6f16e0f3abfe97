"""create_model(clip_weights=file, checkpoint=release file).predict == an independent release re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import tokenize

import vip2clip
from vip2clip.model.weights import TINY_CLIP_CONFIG
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


def random_release_checkpoint(clip_state: dict, seed: int, n_ctx: int = 7, n_dyn: int = 3, hidden: int = 32) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.1):
        return std * torch.randn(*shape, generator=generator)

    # The release's quirk: both prompts' fixed parts come from the anomalous sentence.
    tokens = tokenize([" ".join(["X"] * n_ctx + ["damaged"] + ["X"] * n_dyn)])
    embedded = clip_state["token_embedding.weight"][tokens]
    prompt = {
        "ctx_pos": rand(n_ctx, D),
        "ctx_neg": rand(n_ctx, D),
        "cls_ctx": rand(n_dyn, D),
        "cls_prompter.bias": rand(1, D),
    }
    for h in range(n_dyn):
        prompt.update(
            {
                f"cls_prompter.fc.{h}.0.weight": rand(hidden, D, std=0.3),
                f"cls_prompter.fc.{h}.0.bias": rand(hidden),
                f"cls_prompter.fc.{h}.2.weight": rand(D, hidden, std=0.3),
                f"cls_prompter.fc.{h}.2.bias": rand(D),
            }
        )
    for tag in ("pos", "neg"):
        prompt[f"token_prefix_{tag}"] = embedded[:, :1].clone()
        prompt[f"token_middle_{tag}"] = embedded[:, 1 + n_ctx : 2 + n_ctx].clone()
        prompt[f"token_suffix_{tag}"] = embedded[:, 2 + n_ctx + n_dyn :].clone()
        prompt[f"tokenized_prompts_{tag}"] = tokens.clone()
    fgp = {"prompt_temp_l1": torch.tensor(0.07)}
    for name in ("q_proj_pre", "k_proj_pre_1", "v_proj_pre_1", "proj_post_t"):
        fgp[f"{name}.weight"] = rand(D, D, 1, std=0.4)
        fgp[f"{name}.bias"] = rand(D)
    return {"prompt_learner": prompt, "Zero_try": fgp}


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    clip_state = random_clip_state_dict(seed=123)
    checkpoint = random_release_checkpoint(clip_state, seed=7)
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
