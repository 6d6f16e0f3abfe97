"""Untrained CLIP with its own prompts (`text_prompts="handcrafted"`, the clip-zero-shot preset): the text features
are CLIP's own sentence features averaged over the templates, nothing trainable enters the scores, and training it
is refused; `test` and `benchmark` take it without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import tokenize

import vip2clip
from vip2clip.cli import main
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model import presets
from vip2clip.model.handcrafted import TEMPLATES, handcrafted_sentences
from vip2clip.training.loop import train

pytestmark = pytest.mark.filterwarnings("ignore::vip2clip.metrics.UndefinedMetricWarning")
UNTRAINED = {"text_prompts": "handcrafted", "use_vca": False, "use_fgp": False, "use_utpa": False}


def _model(**options):
    return vip2clip.create_model("tiny", image_size=64, seed=0, **{**UNTRAINED, **options})


def test_the_text_features_are_clips_own_sentence_features_averaged_over_the_templates() -> None:
    model = _model()
    clip = model.backbone.clip
    expected = []
    for sentences in handcrafted_sentences(("good", "damaged")):
        with torch.no_grad():
            features = F.normalize(clip.encode_text(tokenize(sentences)).float(), dim=-1)  # open_clip's own path
        expected.append(F.normalize(features.mean(dim=0), dim=-1))
    text = model.encode_text(None)
    assert text.shape == (1, 2, model.backbone.embed_dim)
    torch.testing.assert_close(text[0], torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert handcrafted_sentences(("good", "damaged"))[1][0] == TEMPLATES[0].format("damaged")


def test_no_learnable_weight_enters_the_scores(tiny_images) -> None:
    model = _model()
    before = model.predict(tiny_images[:, :, :64, :64])
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(1.0)
    after = model.predict(tiny_images[:, :, :64, :64])
    torch.testing.assert_close(before.pred_score, after.pred_score)
    torch.testing.assert_close(before.anomaly_map, after.anomaly_map)


def test_training_untrained_clip_is_refused(tmp_path: Path) -> None:
    generate_benchmark(tmp_path / "data", seed=1, classes=1, image_size=32, n_test_good=1, n_test_defect=1)
    with pytest.raises(ValueError, match="nothing to train"):
        train(_model(), vip2clip.data.index.read_index(tmp_path / "data"), out_dir=tmp_path / "run")
    assert presets.get_preset("clip-zero-shot").config == UNTRAINED
    with pytest.raises(ValueError, match="text_prompts must be one of"):
        _model(text_prompts="typed")


@pytest.fixture
def tiny_clip_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """The clip-zero-shot preset on the tiny backbone (the real one needs ViT-L)."""
    table = dict(presets._table())
    table["clip-zero-shot"] = presets.Preset(**{**table["clip-zero-shot"].__dict__, "backbone": "tiny"})
    monkeypatch.setattr(presets, "_table", lambda: table)
    return "clip-zero-shot"


def test_test_and_benchmark_take_untrained_clip_without_a_checkpoint(tiny_clip_preset, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_benchmark(data, seed=1, classes=1, image_size=48, n_test_good=2, n_test_defect=2)
    model = ["--backbone", tiny_clip_preset, "--image-size", "64", "--no-progress"]
    assert main(["test", "--data", str(data), "--out", str(tmp_path / "test"), *model]) == 0
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert results["model"]["config"]["text_prompts"] == "handcrafted"
    assert results["training"]["zero_shot"]["zero_shot"] is True  # it saw no image
    out = tmp_path / "bench"
    assert main(["benchmark", "--test", f"b={data}", "--out", str(out), *model]) == 0
    assert (out / "benchmark.json").is_file()
    assert main(["benchmark", "--test", f"b={data}", "--train", f"a={data}", "--out", str(out), *model]) == 2
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "train"), *model]) == 2
