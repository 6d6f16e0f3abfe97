"""`model.explain`: the paper's Fig. 3 (FGP attention per prompt and layer) and Fig. 7 (anomaly map per layer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

import vip2clip


def test_layer_maps_average_to_the_fused_map(tiny_model, tiny_images) -> None:
    explanation = tiny_model.explain(tiny_images)
    batch, size = tiny_images.shape[0], tiny_images.shape[-2:]
    layers = len(tiny_model.feature_layers)
    assert explanation.layer_maps.shape == explanation.smoothed_layer_maps.shape == (batch, layers, *size)
    assert explanation.fused_map.shape == explanation.anomaly_map.shape == (batch, *size)
    assert explanation.layers == tiny_model.feature_layers and len(explanation) == batch
    # Before smoothing: the layer maps (each upsampled) average to the fused map (layer mean, then upsampled).
    np.testing.assert_allclose(explanation.layer_maps.mean(axis=1), explanation.fused_map, rtol=0, atol=1e-6)
    # After smoothing: the same, and the fused map is predict's, bit for bit.
    np.testing.assert_allclose(explanation.smoothed_layer_maps.mean(axis=1), explanation.anomaly_map, atol=1e-6)
    prediction = tiny_model.predict(tiny_images)
    np.testing.assert_array_equal(explanation.anomaly_map, prediction.anomaly_map.numpy())
    np.testing.assert_array_equal(explanation.pred_score, prediction.pred_score.numpy())
    # The fused map before smoothing, Gaussian-smoothed (scipy, the release's filter), is the final map.
    sigma = tiny_model.config.sigma
    smoothed = np.stack([gaussian_filter(m.astype(np.float64), sigma, mode="reflect") for m in explanation.fused_map])
    np.testing.assert_allclose(smoothed, explanation.anomaly_map, atol=1e-5)
    assert not np.allclose(explanation.layer_maps[:, 0], explanation.layer_maps[:, -1])  # the layers differ


def _naive_attention(fgp, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Textbook multi-head attention weights (unscaled, as the release): q from the text, k from the patches."""
    batch, heads = patches.shape[0], fgp.heads
    q = fgp.q_proj(text.expand(batch, -1, -1)).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, h, T, d]
    k = fgp.k_proj(patches).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, h, HW, d]
    return (q @ k.transpose(-1, -2)).softmax(dim=-1).mean(dim=1)  # [B, T, HW]


def test_attention_is_the_fgp_weights_per_prompt_and_layer(tiny_model, tiny_images) -> None:
    explanation = tiny_model.explain(tiny_images)
    batch, layers = tiny_images.shape[0], len(tiny_model.feature_layers)
    assert explanation.attention.shape == (batch, layers, 2, *explanation.grid)
    np.testing.assert_allclose(explanation.attention.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    with torch.no_grad():
        features = tiny_model.encode_image(tiny_images)
        text = tiny_model.encode_text(features.global_feature)
        for layer, patches in enumerate(features.patch_tokens):
            expected = _naive_attention(tiny_model.fgp, text, patches).view(batch, 2, *features.grid)
            np.testing.assert_allclose(explanation.attention[:, layer], expected.numpy(), atol=1e-5)
    normal, anomalous = explanation.attention[:, 0, 0], explanation.attention[:, 0, 1]
    assert not np.allclose(normal, anomalous)  # the two prompts look at different patches


def test_without_fgp_there_is_no_attention(tiny_images) -> None:
    model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4, use_fgp=False)
    explanation = model.explain(tiny_images)
    assert explanation.attention is None and explanation.layer_maps.shape[1] == len(model.feature_layers)


def test_explain_keeps_the_training_mode(tiny_images) -> None:
    model = vip2clip.create_model("tiny", image_size=64, seed=0, top_k=4).train()
    model.explain(tiny_images.numpy())  # a float32 array works as for predict
    assert model.training
    with pytest.raises(RuntimeError):
        model.explain(torch.zeros(1, 3, 64))  # not [B, 3, H, W]
