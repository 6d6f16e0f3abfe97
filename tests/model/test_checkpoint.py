"""Checkpoints: our format, the release format, conversions both ways, clear errors."""

from __future__ import annotations

import pytest
import torch

import vip2clip
from conftest import TINY_SIZE
from vip2clip.model.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    load_checkpoint,
    save_checkpoint,
    state_to_release,
)

KWARGS = {"image_size": TINY_SIZE, "top_k": 4}


@pytest.fixture(scope="module")
def trained_like():
    """A model whose trainable weights differ from any fresh seed (as after training)."""
    model = vip2clip.create_model("tiny", seed=11, **KWARGS)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def assert_same_predictions(a, b, images):
    first, second = a.predict(images), b.predict(images)
    torch.testing.assert_close(first.pred_score, second.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map, rtol=0, atol=0)


def test_our_format_round_trip(tmp_path, trained_like, tiny_images):
    path = save_checkpoint(
        tmp_path / "ckpt.pt", trained_like.config, state=trained_like.trainable_state_dict(), epoch=3
    )
    loaded = load_checkpoint(path)
    assert loaded.config == trained_like.config and loaded.meta["epoch"] == 3
    restored = vip2clip.create_model(checkpoint=path)
    assert restored.config == trained_like.config
    assert_same_predictions(trained_like, restored, tiny_images)
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temporary file"


def test_ablation_config_travels_in_the_checkpoint(tmp_path):
    model = vip2clip.create_model("tiny", seed=0, use_vca=False, use_fgp=False, n_context=5, **KWARGS)
    path = save_checkpoint(tmp_path / "ablated.pt", model.config, state=model.trainable_state_dict())
    restored = vip2clip.create_model(checkpoint=path)
    assert (restored.config.use_vca, restored.config.use_fgp, restored.config.n_context) == (False, False, 5)
    assert restored.num_trainable_parameters() == model.num_trainable_parameters()


def test_release_round_trip_both_directions(tmp_path, trained_like, tiny_images):
    ours = save_checkpoint(tmp_path / "ours.pt", trained_like.config, state=trained_like.trainable_state_dict())
    release = convert_checkpoint(ours, tmp_path / "release.pth", to="release")
    payload = torch.load(release, weights_only=True)
    assert set(payload) == {"prompt_learner", "Zero_try"}
    assert payload["Zero_try"]["q_proj_pre.weight"].shape == (64, 64, 1)
    assert payload["prompt_learner"]["cls_prompter.fc.2.2.weight"].shape == (64, 32)
    assert payload["prompt_learner"]["tokenized_prompts_pos"].shape == (1, 77)
    from_release = vip2clip.create_model("tiny", checkpoint=release, **KWARGS)
    assert_same_predictions(trained_like, from_release, tiny_images)

    back = convert_checkpoint(release, tmp_path / "back.pt", to="vip2clip")
    assert_same_predictions(trained_like, vip2clip.create_model("tiny", checkpoint=back, **KWARGS), tiny_images)


def test_release_format_refuses_ablated_models():
    model = vip2clip.create_model("tiny", seed=0, use_fgp=False, **KWARGS)
    with pytest.raises(CheckpointError, match="full model"):
        state_to_release(model.config, model.trainable_state_dict())


def test_wrong_shape_release_checkpoint_is_named(tmp_path, trained_like):
    payload = state_to_release(trained_like.config, trained_like.trainable_state_dict())
    payload["Zero_try"]["k_proj_pre_1.weight"] = torch.zeros(64, 32, 1)
    torch.save(payload, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"fgp\.k_proj\.weight.*\(64, 32\)"):
        vip2clip.create_model("tiny", checkpoint=tmp_path / "bad.pth", **KWARGS)

    del payload["Zero_try"]["proj_post_t.bias"]
    torch.save(payload, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"proj_post_t\.bias"):
        load_checkpoint(tmp_path / "missing.pth")


def test_checkpoint_for_another_backbone_is_refused(tmp_path):
    """A ViT-L-sized release checkpoint cannot go on the tiny backbone: the error names the shapes."""
    model = vip2clip.create_model("tiny", seed=0, **KWARGS)
    payload = state_to_release(model.config, model.trainable_state_dict())
    payload["prompt_learner"]["ctx_pos"] = torch.zeros(7, 768)
    payload["prompt_learner"]["ctx_neg"] = torch.zeros(7, 768)
    torch.save(payload, tmp_path / "vitl.pth")
    with pytest.raises(ValueError, match=r"ctx_pos \(7, 768\)"):
        vip2clip.create_model("tiny", checkpoint=tmp_path / "vitl.pth", **KWARGS)


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_backbone_mismatch_is_an_error(tmp_path):
    model = vip2clip.create_model("tiny", seed=0, **KWARGS)
    path = save_checkpoint(tmp_path / "tiny.pt", model.config, state=model.trainable_state_dict())
    with pytest.raises(ValueError, match="trained on backbone 'tiny'"):
        vip2clip.create_model("ViT-B-16", checkpoint=path)
