"""Frozen-feature cache: values, reuse without the encoder, stale / partial / crashed caches, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vip2clip
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.images import load_image
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.features.cache_key import MANIFEST, cache_key
from vip2clip.features.feature_cache import load_or_build_cache, open_cache

SIZE = 64


class EncoderCounter:
    """Counts images through model.backbone.encode_image (instance attribute; the model is this test's own)."""

    def __init__(self, model) -> None:
        self.images = 0
        self.original = model.backbone.encode_image
        model.backbone.encode_image = self

    def __call__(self, images: torch.Tensor):
        self.images += images.shape[0]
        return self.original(images)


@pytest.fixture(scope="module")
def model():
    return vip2clip.create_model("tiny", image_size=SIZE, seed=0, top_k=4)


@pytest.fixture
def dataset(tmp_path: Path) -> AnomalyDataset:
    index = generate_benchmark(tmp_path / "bench", classes=1, image_size=SIZE, n_test_good=3, n_test_defect=3)
    return AnomalyDataset(index, image_size=SIZE)


def build(model, dataset, directory, dtype="float16"):
    return load_or_build_cache(model, dataset, directory=directory, dtype=dtype, batch_size=4)


def test_cached_values_match_the_encoder(model, dataset: AnomalyDataset, tmp_path: Path) -> None:
    cache = build(model, dataset, tmp_path / "c16")
    exact = build(model, dataset, tmp_path / "c32", dtype="float32")
    rows = [4, 0, 2]
    direct = model.encode_image(torch.stack([dataset[i]["image"] for i in rows]))
    for stored, tolerance in ((cache.features(rows), 1e-3), (exact.features(rows), 1e-6)):
        assert stored.grid == direct.grid == (4, 4)
        assert len(stored.patch_tokens) == len(direct.patch_tokens) == len(model.feature_layers)
        for got, want in zip(stored.patch_tokens, direct.patch_tokens, strict=True):
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=tolerance, rtol=0)
        torch.testing.assert_close(stored.global_feature, direct.global_feature, atol=tolerance, rtol=0)
    masks = torch.stack([dataset[i]["mask"] for i in rows])
    assert torch.equal(cache.masks(rows), masks) and masks.sum() > 0
    # Outputs of the trainable part from cached and fresh features agree to fp16 tolerance.
    torch.testing.assert_close(
        model.forward_features(cache.features(rows)).image_logits,
        model.forward_features(direct).image_logits,
        atol=2e-2,
        rtol=0,
    )
    assert isinstance(cache.patch_tokens, np.memmap) and cache.patch_tokens.dtype == np.float16
    assert cache.disk_bytes == sum(f.stat().st_size for f in cache.directory.iterdir())
    assert cache.directory.parent == tmp_path / "c16"  # one slot folder inside the cache directory


def test_reopening_runs_no_encoder(dataset: AnomalyDataset, tmp_path: Path) -> None:
    model = vip2clip.create_model("tiny", image_size=SIZE, seed=0, top_k=4)
    counter = EncoderCounter(model)
    build(model, dataset, tmp_path / "c")
    assert counter.images >= len(dataset)
    before = counter.images
    cache = build(model, dataset, tmp_path / "c")
    assert counter.images == before and len(cache) == len(dataset) and cache.valid_indices == list(range(6))


def test_stale_cache_is_rebuilt(model, dataset: AnomalyDataset, tmp_path: Path) -> None:
    first = build(model, dataset, tmp_path / "c")
    old = first.features([1]).global_feature.clone()
    victim = dataset.index.resolve(dataset.samples[1].img_path)
    pixels = np.asarray(load_image(victim)).copy()
    Image.fromarray(255 - pixels).save(victim)  # same name, other content
    again = build(model, dataset, tmp_path / "c")
    fresh = model.encode_image(dataset[1]["image"][None]).global_feature
    torch.testing.assert_close(again.features([1]).global_feature, fresh, atol=1e-3, rtol=0)
    assert not torch.allclose(old, fresh, atol=1e-2)
    assert again.directory == first.directory  # same settings and paths: the slot is rebuilt, not added
    # Another image size gets its own slot beside the first one.
    other = vip2clip.create_model("tiny", image_size=32, seed=0, top_k=4)
    small = build(other, AnomalyDataset(dataset.index, image_size=32), tmp_path / "c")
    assert small.grid == (2, 2) and json.loads((small.directory / MANIFEST).read_text())["key"]["image_size"] == 32
    assert small.directory != again.directory and open_cache(again.directory, cache_key(model, dataset)) is not None


def test_partial_caches_are_detected(model, dataset: AnomalyDataset, tmp_path: Path) -> None:
    directory = tmp_path / "c"
    slot = build(model, dataset, directory).directory
    key = cache_key(model, dataset)
    assert open_cache(slot, key) is not None
    tokens = slot / "patch_tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-100])  # truncated
    assert open_cache(slot, key) is None
    build(model, dataset, directory)
    (slot / MANIFEST).unlink()  # damaged by hand
    assert open_cache(slot, key) is None
    assert build(model, dataset, directory).valid_indices == list(range(6))


def test_crash_during_build_leaves_the_old_cache_or_nothing(dataset: AnomalyDataset, tmp_path: Path) -> None:
    model = vip2clip.create_model("tiny", image_size=SIZE, seed=0, top_k=4)
    slot = build(model, dataset, tmp_path / "c").directory
    manifest = (slot / MANIFEST).read_text()
    original = model.backbone.encode_image

    def failing(images):
        if images.shape[0] > 1:
            raise RuntimeError("simulated crash")
        return original(images)

    model.backbone.encode_image = failing
    (dataset.index.resolve(dataset.samples[0].img_path)).write_bytes(
        (dataset.index.resolve(dataset.samples[1].img_path)).read_bytes()
    )  # key changes -> rebuild -> crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(model, dataset, tmp_path / "c")
    # The previous (now stale) cache is untouched, no build folder is left, and the stale cache is not used.
    assert (slot / MANIFEST).read_text() == manifest
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f".{slot.name}.lock", slot.name]
    assert open_cache(slot, cache_key(model, dataset)) is None


def test_undecodable_image_is_recorded(model, tmp_path: Path) -> None:
    index = generate_benchmark(tmp_path / "bench", classes=1, image_size=SIZE, n_test_good=3, n_test_defect=3)
    victim = index.resolve(index.samples("test")[2].img_path)
    victim.write_bytes(victim.read_bytes()[:150])  # header readable, pixels cut
    dataset = AnomalyDataset(index, image_size=SIZE, skip_bad=True)
    cache = build(model, dataset, tmp_path / "c")
    assert cache.valid_indices == [0, 1, 3, 4, 5]
    assert [path for path, _ in dataset.skipped] == [str(victim)]
    again = AnomalyDataset(index, image_size=SIZE, skip_bad=True)
    build(model, again, tmp_path / "c")  # reopened: the failure is still reported
    assert [path for path, _ in again.skipped] == [str(victim)]


def test_the_cache_records_each_images_pixel_digest_also_when_built_by_an_older_vip2clip(
    model, dataset: AnomalyDataset, tmp_path: Path
) -> None:
    """The checkpoint's record of its training images (`data.zero_shot`) comes from the build, which decodes the
    images anyway; a cache built before the manifest held them is decoded for it instead of rebuilt."""
    from vip2clip.data.zero_shot import index_digests

    cache = build(model, dataset, tmp_path / "c")
    expected = index_digests(dataset.index, "test")
    assert cache.pixels == expected and cache.image_digests(dataset, [2, 0]) == [expected[2], expected[0]]
    manifest_path = cache.directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["pixels"]
    manifest_path.write_text(json.dumps(manifest))
    older = open_cache(cache.directory, cache_key(model, dataset))
    assert older is not None and older.pixels is None
    assert older.image_digests(dataset, [2, 0]) == [expected[2], expected[0]]
