"""The composed model: shapes, frozen backbone, ablation switches, determinism, parameter counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import vip2clip
from conftest import TINY_SIZE
from vip2clip.config import OPENAI_MEAN, OPENAI_STD, ModelConfig
from vip2clip.data.transforms import preprocess_array

ABLATIONS = list(itertools.product([True, False], repeat=3))  # (use_utpa, use_vca, use_fgp): paper Table 4


def test_predict_shapes_dtypes_and_ranges(tiny_model, tiny_images):
    prediction = tiny_model.predict(tiny_images)
    assert prediction.pred_score.shape == (2,) and prediction.pred_score.dtype == torch.float32
    assert prediction.anomaly_map.shape == (2, TINY_SIZE, TINY_SIZE)
    assert not prediction.pred_score.requires_grad and not prediction.anomaly_map.requires_grad
    assert ((prediction.pred_score > 0) & (prediction.pred_score < 1)).all()
    assert ((prediction.anomaly_map >= 0) & (prediction.anomaly_map <= 1)).all()


def test_only_prompts_and_fgp_receive_gradients(tiny_images):
    model = vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=0, top_k=4)
    output = model(tiny_images)
    loss = output.image_logits.logsumexp(-1).sum() + sum(p[..., 1].sum() for p in output.probabilities)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    names = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert names == {"prompts", "fgp"}
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for n, g in grads.items() if n != "fgp.unused_scale")


@pytest.mark.slow
def test_paper_parameter_count_for_vit_l14():
    """VCA 1,786,752 + FGP 2,362,369 = 4,149,121 (paper Table 3: 4.15 M)."""
    model = vip2clip.create_model("ViT-L-14-336", random_init=True)
    assert model.num_trainable_parameters() == 4_149_121
    assert sum(p.numel() for p in model.prompts.parameters()) == 1_786_752
    assert sum(p.numel() for p in model.fgp.parameters()) == 2_362_369
    assert model.feature_layers == (6, 12, 18, 24)
    assert model.prompts.eot_positions().tolist() == [12, 12]


@pytest.mark.parametrize(("use_utpa", "use_vca", "use_fgp"), ABLATIONS)
def test_every_table4_combination_runs(tiny_images, use_utpa, use_vca, use_fgp):
    model = vip2clip.create_model(
        "tiny", image_size=TINY_SIZE, seed=0, top_k=4, use_utpa=use_utpa, use_vca=use_vca, use_fgp=use_fgp
    )
    prediction = model.predict(tiny_images)
    assert torch.isfinite(prediction.pred_score).all() and torch.isfinite(prediction.anomaly_map).all()
    assert (model.fgp is not None) == use_fgp
    assert (model.prompts.metanet is not None) == use_vca


def test_ablation_switches_change_what_they_should(tiny_images):
    kwargs = {"backbone": "tiny", "image_size": TINY_SIZE, "seed": 0, "top_k": 4}
    full = vip2clip.create_model(**kwargs)
    reference = full.predict(tiny_images)

    # UTPA off: the same weights, same pixel maps, but the image score comes from the global feature.
    dual = vip2clip.create_model(**kwargs, use_utpa=False)
    dual.load_trainable_state_dict(full.trainable_state_dict())
    dual_prediction = dual.predict(tiny_images)
    torch.testing.assert_close(dual_prediction.anomaly_map, reference.anomaly_map)
    assert not torch.allclose(dual_prediction.pred_score, reference.pred_score)

    # VCA off: one static prompt pair for the whole batch.
    static = vip2clip.create_model(**kwargs, use_vca=False)
    assert static.encode_text(None).shape[0] == 1
    assert full.num_trainable_parameters() - static.num_trainable_parameters() == sum(
        p.numel() for p in full.prompts.metanet.parameters()
    )

    # FGP off: every layer scores against the same text features.
    no_fgp = vip2clip.create_model(**kwargs, use_fgp=False)
    output = no_fgp(tiny_images)
    features = no_fgp.encode_image(tiny_images)
    expected = features.patch_tokens[0] @ output.text.transpose(1, 2)
    torch.testing.assert_close(output.similarities[0], expected)


def test_top_k_image_score_matches_formula(tiny_model, tiny_images):
    output = tiny_model(tiny_images)
    pooled = []
    for sim, prob in zip(output.similarities, output.probabilities, strict=True):
        for b in range(2):
            order = torch.argsort(prob[b, :, 1], descending=True)[: tiny_model.config.top_k]
            pooled.append(sim[b, order])
    per_image = torch.stack(pooled).view(4, 2, tiny_model.config.top_k, 2).transpose(0, 1).reshape(2, -1, 2)
    expected = (per_image.mean(1) / 0.07).softmax(-1)[:, 1]
    torch.testing.assert_close(tiny_model.predict(tiny_images).pred_score, expected)


def test_seeded_creation_and_prediction_are_deterministic(tiny_images):
    first = vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=3).predict(tiny_images)
    second = vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=3).predict(tiny_images)
    third = vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=4).predict(tiny_images)
    torch.testing.assert_close(first.pred_score, second.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(first.anomaly_map, second.anomaly_map, rtol=0, atol=0)
    assert not torch.equal(first.pred_score, third.pred_score)


def test_state_words_and_prompt_lengths_are_configurable(tiny_images):
    model = vip2clip.create_model(
        "tiny", image_size=TINY_SIZE, seed=0, state_words=("flawless", "imperfect"), n_context=4, n_dynamic=2
    )
    assert model.prompts.context_normal.shape == (4, 64) and model.prompts.generic.shape == (2, 64)
    assert len(model.prompts.metanet.heads) == 2
    eot = model.prompts.eot_positions()
    assert eot.tolist() == [
        1 + 4 + model.prompts.state_normal.shape[1] + 2,
        1 + 4 + model.prompts.state_anomalous.shape[1] + 2,
    ]
    assert torch.isfinite(model.predict(tiny_images).pred_score).all()


def test_text_length_follows_the_token_buffers():
    """The text length is a Python int (ONNX export cannot read tensors), kept in step with the token buffers."""
    model = vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=0)
    assert model.prompts.eot == (12, 12) and model.prompts.text_length == 13
    tokens = model.prompts.tokens_anomalous.clone()
    tokens[0, 15], tokens[0, 12] = tokens[0, 12], 269  # the end-of-text token three positions later
    model.load_state_dict({**model.state_dict(), "prompts.tokens_anomalous": tokens})
    assert model.prompts.eot == (12, 15) and model.prompts.text_length == 16
    assert model.prompts.eot_positions().tolist() == [12, 15]


def test_truncated_and_full_text_give_the_same_prediction(tiny_model, tiny_images):
    full = vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=0, top_k=4, truncate_text=False)
    a, b = tiny_model.predict(tiny_images), full.predict(tiny_images)
    torch.testing.assert_close(a.pred_score, b.pred_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-6)


def test_preprocess_matches_the_release_pipeline():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8), mode="L")
    tensor = vip2clip.preprocess(image, image_size=32)
    np.testing.assert_array_equal(tensor.numpy(), preprocess_array(image, 32))  # the torch-free twin: same numbers
    rgb = np.asarray(image.convert("RGB").resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    expected = (rgb - np.array(OPENAI_MEAN, dtype=np.float32)) / np.array(OPENAI_STD, dtype=np.float32)
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_unknown_option_and_bad_config_are_rejected():
    with pytest.raises(TypeError, match="unknown model option"):
        vip2clip.create_model("tiny", no_such_option=1)
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(top_k=0)
    with pytest.raises(ValueError, match="feature layers"):
        vip2clip.create_model("tiny", feature_layers=(2, 9))
