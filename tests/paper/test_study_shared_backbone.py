"""A study builds its frozen CLIP once (`factory.SharedBackbones`) and every variant's model, for training and
testing, runs on it: the same numbers as building a fresh CLIP per model, and nothing of it changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vip2clip import factory
from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.factory import SharedBackbones, create_model
from vip2clip.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
TWO_VARIANTS = ["--variants", "vca,utpa+vca+fgp", "--backbone", "tiny", "--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def protocol(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One direction (train on a set, test on another) of two small synthetic sets."""
    base = tmp_path_factory.mktemp("shared_backbone")
    for name, seed in (("train", 5), ("test", 6)):
        generate_benchmark(
            base / name, seed=seed, classes=1, image_size=48, n_train_good=0, n_test_good=2, n_test_defect=2
        )
    return ["--train", f"mvtec={base / 'train'}", "--test", f"visa={base / 'test'}", "--epochs", "1"]


def _counting_loads(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """Every CLIP that `create_model` builds, in order."""
    built, load = [], factory.load_clip

    def counted(*args, **kwargs):
        clip, source = load(*args, **kwargs)
        built.append(clip)
        return clip, source

    monkeypatch.setattr(factory, "load_clip", counted)
    return built


def _study_numbers(out: Path) -> tuple[list, dict[str, torch.Tensor]]:
    """study.json's variants and every trained checkpoint's weights."""
    variants = json.loads((out / "study.json").read_text())["variants"]
    weights = {}
    for path in sorted((out / "models").rglob("checkpoint.pt")):
        state = load_checkpoint(path).state
        weights.update({f"{path.relative_to(out)}:{key}": value for key, value in state.items()})
    return variants, weights


def test_a_study_builds_one_frozen_clip_and_leaves_it_unchanged(protocol, tmp_path: Path, monkeypatch) -> None:
    built = _counting_loads(monkeypatch)
    assert main(["study", "modules", *protocol, *TWO_VARIANTS, "--out", str(tmp_path / "study")]) == 0
    assert len(built) == 1  # not one per variant (and per test of a unit read back: `_trained_model`)
    clip = built[0]
    assert not any(p.requires_grad for p in clip.parameters()) and not any(m.training for m in clip.modules())
    fresh = factory.load_clip("tiny", None)[0].state_dict()
    assert all(torch.equal(value, fresh[key]) for key, value in clip.state_dict().items())


def test_sharing_the_frozen_clip_changes_no_number(protocol, tmp_path: Path, monkeypatch) -> None:
    assert main(["study", "modules", *protocol, *TWO_VARIANTS, "--out", str(tmp_path / "shared")]) == 0
    built = _counting_loads(monkeypatch)

    def unshared(self, name, weights, *, quick_gelu, device):
        return factory.load_clip(name, weights)

    monkeypatch.setattr(SharedBackbones, "clip", unshared)
    assert main(["study", "modules", *protocol, *TWO_VARIANTS, "--out", str(tmp_path / "alone")]) == 0
    assert len(built) == 2  # one CLIP per variant: the comparison ran unshared
    (shared_variants, shared_weights), (alone_variants, alone_weights) = map(
        _study_numbers, (tmp_path / "shared", tmp_path / "alone")
    )
    assert json.dumps(shared_variants) == json.dumps(alone_variants)
    assert shared_weights.keys() == alone_weights.keys() and len(shared_weights) > 0
    assert all(torch.equal(value, alone_weights[key]) for key, value in shared_weights.items())


def test_models_on_one_clip_keep_their_own_layers_and_precision(tiny_images) -> None:
    shared = SharedBackbones()
    default = create_model("tiny", image_size=64, seed=0, shared=shared)
    other = create_model("tiny", image_size=64, seed=0, shared=shared, feature_layers=(1,), precision="bf16")
    alone = create_model("tiny", image_size=64, seed=0, feature_layers=(1,))
    assert len(shared) == 1 and default.backbone.clip is other.backbone.clip
    assert default.feature_layers != other.feature_layers == alone.feature_layers == (1,)
    assert default.backbone.compute_dtype is None and other.backbone.compute_dtype == torch.bfloat16
    other.set_precision("fp32")
    expected = alone.encode_image(tiny_images).patch_tokens
    assert all(torch.equal(a, b) for a, b in zip(other.encode_image(tiny_images).patch_tokens, expected, strict=True))
