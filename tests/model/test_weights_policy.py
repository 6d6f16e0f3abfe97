"""The one weights policy (`vip2clip.model.weights_policy`): no silent random CLIP weights for a real backbone, and a
checkpoint runs only on the CLIP weights it was trained with, in the API, the command line and the anomalib model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import vip2clip
from vip2clip.cli import main
from vip2clip.config import ModelConfig
from vip2clip.inference.assembly import ModelSpec
from vip2clip.model.checkpoint import load_checkpoint, save_checkpoint
from vip2clip.model.weights_policy import NO_CLIP_WEIGHTS

NO_WEIGHTS = NO_CLIP_WEIGHTS.format(backbone="ViT-B-16")


@pytest.fixture
def real_backbone_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint of a backbone with published weights (its state is never reached: the weights come first)."""
    return save_checkpoint(tmp_path / "vit-b.pt", ModelConfig(backbone="ViT-B-16", image_size=224), state={})


@pytest.fixture
def other_weights(tmp_path: Path) -> Path:
    """CLIP weights for the tiny backbone other than its seeded random ones (an OpenAI-format state dict)."""
    clip = vip2clip.create_model("tiny", image_size=32).backbone.clip
    state = {key: value + 0.01 for key, value in clip.state_dict().items()}
    torch.save(state, tmp_path / "other-tiny-clip.pt")
    return tmp_path / "other-tiny-clip.pt"


def test_the_api_refuses_a_checkpoint_without_clip_weights(real_backbone_checkpoint: Path) -> None:
    with pytest.raises(ValueError) as created:
        vip2clip.create_model(checkpoint=real_backbone_checkpoint)
    with pytest.raises(ValueError) as predictor:
        vip2clip.Predictor.from_checkpoint(real_backbone_checkpoint)
    with pytest.raises(ValueError) as bare:
        vip2clip.create_model("ViT-B-16")
    assert str(created.value) == str(predictor.value) == str(bare.value) == NO_WEIGHTS


def test_the_command_line_gives_the_same_message(real_backbone_checkpoint: Path, capsys) -> None:
    assert main(["info", "--checkpoint", str(real_backbone_checkpoint)]) == 2
    assert NO_WEIGHTS in capsys.readouterr().err


def test_the_anomalib_model_gives_the_same_message(real_backbone_checkpoint: Path) -> None:
    pytest.importorskip("anomalib")
    from vip2clip.integrations.anomalib import ViP2CLIP

    with pytest.raises(ValueError) as error:
        ViP2CLIP(checkpoint=real_backbone_checkpoint)
    assert str(error.value) == NO_WEIGHTS


def test_random_weights_on_purpose_and_the_tiny_exception() -> None:
    assert vip2clip.create_model("tiny", image_size=32).backbone.weights_source.startswith("random init")
    spec = ModelSpec(backbone="ViT-B-16", random_init=True)
    assert spec.random_init  # build_model(spec) builds a random ViT-B-16 (not run: too large for a unit test)
    with pytest.raises(ValueError, match="not both"):
        ModelSpec(clip_weights="ViT-L-14-336px.pt", random_init=True)


def test_training_records_the_clip_weights_fingerprint(demo_checkpoint: Path, caplog) -> None:
    recorded = load_checkpoint(demo_checkpoint).meta["backbone"]["fingerprint"]
    with caplog.at_level(logging.WARNING, logger="vip2clip.model.weights_policy"):
        model = vip2clip.create_model(checkpoint=demo_checkpoint)
    assert model.backbone.fingerprint() == recorded
    assert not [record for record in caplog.records if record.name == "vip2clip.model.weights_policy"]  # silent


def test_a_checkpoint_on_other_clip_weights_is_refused(demo_checkpoint: Path, other_weights: Path, capsys) -> None:
    recorded = load_checkpoint(demo_checkpoint).meta["backbone"]["fingerprint"]
    used = vip2clip.create_model("tiny", clip_weights=other_weights, image_size=32).backbone.fingerprint()
    with pytest.raises(ValueError, match="trained on CLIP weights with fingerprint") as error:
        vip2clip.Predictor.from_checkpoint(demo_checkpoint, clip_weights=other_weights)
    assert recorded in str(error.value) and used in str(error.value) and "allow_other_weights=True" in str(error.value)
    command = ["info", "--checkpoint", str(demo_checkpoint), "--clip-weights", str(other_weights)]
    assert main(command) == 2
    assert str(error.value) in capsys.readouterr().err


def test_other_clip_weights_run_when_allowed(demo_checkpoint: Path, other_weights: Path, capsys, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vip2clip.model.weights_policy"):
        model = vip2clip.create_model(checkpoint=demo_checkpoint, clip_weights=other_weights, allow_other_weights=True)
    assert "allowed: running it anyway" in caplog.text
    assert torch.isfinite(model.predict(torch.zeros(1, 3, 128, 128)).pred_score).all()
    command = ["info", "--checkpoint", str(demo_checkpoint), "--clip-weights", str(other_weights)]
    assert main([*command, "--allow-other-clip-weights"]) == 0


def test_a_checkpoint_without_a_fingerprint_loads_with_a_warning(tiny_model, tmp_path: Path, caplog) -> None:
    old = save_checkpoint(tmp_path / "old.pt", tiny_model.config, state=tiny_model.trainable_state_dict())
    with caplog.at_level(logging.WARNING, logger="vip2clip.model.weights_policy"):
        vip2clip.create_model(checkpoint=old)
    assert "records no fingerprint of the CLIP weights" in caplog.text
