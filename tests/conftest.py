"""Shared fixtures: a tiny random CLIP built by open_clip's own classes (no network), small images."""

from __future__ import annotations

import pytest
import torch

import vip2clip

TINY_SIZE = 64  # 4x4 patch grid with the tiny backbone's 16-pixel patches


@pytest.fixture(scope="session")
def tiny_model():
    """A ViP²-CLIP on the tiny random backbone (shared: tests must not modify it)."""
    return vip2clip.create_model("tiny", image_size=TINY_SIZE, seed=0, top_k=4)


@pytest.fixture
def tiny_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=generator)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
