"""`model.preprocess(image)`: the release's preprocessing at the model's own input size (the checkpoint's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vip2clip
from vip2clip.data import transforms
from vip2clip.model.checkpoint import save_checkpoint


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGBA")  # another size and mode than the model's input


def test_model_preprocess_equals_the_explicit_call(tiny_model) -> None:
    image = _image()
    prepared = tiny_model.preprocess(image)
    assert prepared.shape == (3, tiny_model.config.image_size, tiny_model.config.image_size)
    assert torch.equal(prepared, vip2clip.preprocess(image, image_size=tiny_model.config.image_size))
    assert vip2clip.preprocess is transforms.preprocess  # one implementation, two doors


def test_a_loaded_checkpoint_brings_its_input_size(tmp_path: Path) -> None:
    at_48 = vip2clip.create_model("tiny", image_size=48, seed=0)
    path = save_checkpoint(tmp_path / "at48.pt", at_48.config, state=at_48.trainable_state_dict())
    loaded = vip2clip.create_model(checkpoint=path)
    assert torch.equal(loaded.preprocess(_image()), vip2clip.preprocess(_image(), image_size=48))
    batch = torch.stack([loaded.preprocess(_image())] * 2)
    assert loaded.predict(batch).anomaly_map.shape == (2, 48, 48)
