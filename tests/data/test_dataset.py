"""AnomalyDataset on generated benchmarks with deliberately broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vip2clip.data.dataset import AnomalyDataset, collate_items
from vip2clip.data.images import BadImageError
from vip2clip.data.index import DatasetIndex, Sample, build_index
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.data.transforms import preprocess, preprocess_mask

SIZE = 32


@pytest.fixture
def bench(tmp_path: Path) -> DatasetIndex:
    return generate_benchmark(
        tmp_path / "bench", classes=2, image_size=48, n_train_good=2, n_test_good=2, n_test_defect=2
    )


def _first_defect(index: DatasetIndex):
    return next(s for s in index.samples("test") if s.anomaly)


def test_items_match_independent_preprocessing(bench: DatasetIndex) -> None:
    dataset = AnomalyDataset(bench, image_size=SIZE)
    assert len(dataset) == len(bench.samples("test")) == 8
    for i, sample in enumerate(bench.samples("test")):
        item = dataset[i]
        assert item["image"].shape == (3, SIZE, SIZE) and item["mask"].shape == (SIZE, SIZE)
        assert item["label"] == sample.anomaly and item["cls_name"] == sample.cls_name and item["index"] == i
        assert Path(item["path"]).is_absolute() and Path(item["path"]) == (bench.root / sample.img_path).absolute()
        expected = preprocess(Image.open(bench.root / sample.img_path), SIZE)
        torch.testing.assert_close(item["image"], expected)
        if sample.anomaly:
            raw = np.asarray(Image.open(bench.root / sample.mask_path)) > 0
            torch.testing.assert_close(item["mask"], preprocess_mask(raw, SIZE))
            assert item["mask"].sum() > 0
        else:
            assert item["mask"].sum() == 0
    assert dataset.labels == [s.anomaly for s in bench.samples("test")]


def test_classes_and_train_split(bench: DatasetIndex) -> None:
    name = bench.classes()[1]
    assert {AnomalyDataset(bench, classes=[name], image_size=SIZE)[i]["cls_name"] for i in range(4)} == {name}
    train = AnomalyDataset(bench, split="train", image_size=SIZE)
    assert len(train) == 4 and all(item["label"] == 0 for item in train)
    with pytest.raises(ValueError, match="unknown class"):
        AnomalyDataset(bench, classes=["nope"])


def test_loader_batches(bench: DatasetIndex) -> None:
    loader = DataLoader(AnomalyDataset(bench, image_size=SIZE), batch_size=3, collate_fn=collate_items)
    batches = list(loader)
    assert [len(b["path"]) for b in batches] == [3, 3, 2]
    assert batches[0]["image"].shape == (3, 3, SIZE, SIZE) and batches[0]["label"].dtype == torch.long


def test_missing_and_unreadable_files_fail_at_construction(bench: DatasetIndex) -> None:
    victim = bench.root / bench.samples("test")[0].img_path
    victim.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="cannot read image header") as caught:
        AnomalyDataset(bench, image_size=SIZE)
    assert caught.value.path.resolve() == victim.resolve()
    victim.unlink()
    with pytest.raises(BadImageError, match="no such file"):
        AnomalyDataset(bench, image_size=SIZE)
    dataset = AnomalyDataset(bench, image_size=SIZE, skip_bad=True)
    assert len(dataset) == 7 and dataset.skipped[0][0] == str(victim) and "no such file" in dataset.skipped[0][1]


def test_wrong_size_mask_and_missing_mask(bench: DatasetIndex) -> None:
    sample = _first_defect(bench)
    mask_path = bench.root / sample.mask_path
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(mask_path)
    with pytest.raises(BadImageError, match="mask is 12x10 but its image") as caught:
        AnomalyDataset(bench, image_size=SIZE)
    assert caught.value.path.resolve() == mask_path.resolve()
    mask_path.unlink()
    with pytest.raises(BadImageError, match="no such file"):
        AnomalyDataset(bench, image_size=SIZE)
    dataset = AnomalyDataset(bench, image_size=SIZE, skip_bad=True)
    assert len(dataset) == 7 and [p for p, _ in dataset.skipped] == [str(mask_path)]


def test_truncated_image_fails_at_load_or_is_skipped(bench: DatasetIndex) -> None:
    victim = bench.root / bench.samples("test")[1].img_path
    victim.write_bytes(victim.read_bytes()[:200])  # header intact, pixel data cut
    dataset = AnomalyDataset(bench, image_size=SIZE)  # headers pass
    with pytest.raises(BadImageError) as caught:
        dataset[1]
    assert caught.value.path.resolve() == victim.resolve()
    skipping = AnomalyDataset(bench, image_size=SIZE, skip_bad=True)
    batches = list(DataLoader(skipping, batch_size=4, collate_fn=collate_items))
    assert [len(b["path"]) for b in batches] == [3, 4]
    assert str(victim) not in batches[0]["path"] and skipping.skipped[0][0] == str(victim)


def test_collate_of_only_skipped_items_is_none() -> None:
    assert collate_items([None, None]) is None


@pytest.mark.parametrize("kind", ["rgba", "gray", "sixteen"])
def test_unusual_modes_become_rgb(tmp_path: Path, kind: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 40, 4), dtype=np.uint8)
    arrays = {"rgba": pixels, "gray": pixels[..., 0], "sixteen": pixels[..., 0].astype(np.uint16) * 257}
    Image.fromarray(arrays[kind]).save(tmp_path / "x.png")
    index = build_index(
        tmp_path, {"test": [Sample(img_path="x.png", mask_path="", cls_name="c", specie_name="good", anomaly=0)]}
    )
    item = AnomalyDataset(index, image_size=SIZE)[0]
    rgb = pixels[..., :3] if kind == "rgba" else np.repeat(pixels[..., :1], 3, axis=2)
    torch.testing.assert_close(item["image"], preprocess(Image.fromarray(rgb), SIZE))
