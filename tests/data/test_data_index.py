"""meta.json reading (lenient), writing (clean, atomic) and path resolution, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vip2clip.data.index import (
    DatasetIndex,
    IndexFormatError,
    Sample,
    build_index,
    read_index,
    write_index,
)

GOOD = Sample(img_path="bottle/test/good/000.png", mask_path="", cls_name="bottle", specie_name="good", anomaly=0)
BROKEN = Sample(
    img_path="bottle/test/broken/000.png",
    mask_path="bottle/ground_truth/broken/000_mask.png",
    cls_name="bottle",
    specie_name="broken",
    anomaly=1,
)
TRAIN = Sample(img_path="bottle/train/good/000.png", mask_path="", cls_name="bottle", specie_name="good", anomaly=0)
CABLE = Sample(img_path="cable/test/good/000.png", mask_path="", cls_name="cable", specie_name="good", anomaly=0)


def _touch(root: Path, *relative: str) -> None:
    for name in relative:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    index = build_index(tmp_path, {"train": [TRAIN], "test": [GOOD, BROKEN, CABLE]})
    written = write_index(index)
    assert written == tmp_path / "meta.json"
    text = written.read_text()
    assert text.startswith('{\n    "train": {\n        "bottle": [\n            {\n                "img_path"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]  # no temporary file left behind
    back = read_index(tmp_path)
    assert back.root == tmp_path
    assert back.splits == {"train": {"bottle": [TRAIN]}, "test": {"bottle": [GOOD, BROKEN], "cable": [CABLE]}}
    assert read_index(written).splits == back.splits


def test_write_always_has_both_splits_and_accepts_a_folder(tmp_path: Path) -> None:
    index = build_index(tmp_path, {"test": [GOOD]})
    out = tmp_path / "elsewhere"
    out.mkdir()
    written = write_index(index, out)
    assert written == out / "meta.json"
    data = json.loads(written.read_text())
    assert list(data) == ["train", "test"]
    assert data["train"] == {}


def test_reader_accepts_the_quirks_of_other_writers(tmp_path: Path) -> None:
    _touch(tmp_path, "skin/a.jpg", "skin/a_seg.png", "skin/b.jpg")
    absolute_image = (tmp_path / "skin" / "a.jpg").as_posix()
    raw = {
        "Train": {},
        "Test": {
            "skin": [
                {
                    "img_path": absolute_image,
                    "mask_path": "skin//a_seg.png",
                    "cls_name": "skin",
                    "specie_name": "",
                    "anomaly": True,
                    "normal_path": "",
                },
                {"img_path": "skin//b.jpg", "cls_name": "skin", "specie_name": "good", "anomaly": "0"},
                {"img_path": "skin/b.jpg", "mask_path": None, "anomaly": 0.0},
            ]
        },
    }
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    index = read_index(tmp_path / "meta.json")
    assert set(index.splits) == {"train", "test"}
    first, second, third = index.samples("TEST")
    assert first == Sample(
        img_path=absolute_image, mask_path="skin/a_seg.png", cls_name="skin", specie_name="", anomaly=1
    )
    assert second == Sample(img_path="skin/b.jpg", mask_path="", cls_name="skin", specie_name="good", anomaly=0)
    # cls_name falls back to the class key
    assert third == Sample(img_path="skin/b.jpg", mask_path="", cls_name="skin", specie_name="", anomaly=0)
    assert index.resolve(first.img_path) == tmp_path / "skin" / "a.jpg"
    assert index.resolve(first.mask_path) == tmp_path / "skin" / "a_seg.png"
    # The clean writer turns the absolute path into a root-relative one.
    write_index(index)
    assert json.loads((tmp_path / "meta.json").read_text())["test"]["skin"][0]["img_path"] == "skin/a.jpg"


def test_resolve_absolute_path_from_another_machine(tmp_path: Path) -> None:
    _touch(tmp_path, "bottle/test/good/000.png")
    index = DatasetIndex(root=tmp_path)
    moved = "/nonexistent/old/home/mvtec/bottle/test/good/000.png"
    assert index.resolve(moved) == tmp_path / "bottle/test/good/000.png"
    assert index.resolve("/nonexistent/nothing/here.png") == Path("/nonexistent/nothing/here.png")
    assert index.resolve("bottle//test/good/000.png") == tmp_path / "bottle/test/good/000.png"


def test_write_elsewhere_keeps_paths_valid(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _touch(root, GOOD.img_path, BROKEN.img_path, BROKEN.mask_path)
    index = build_index(root, {"test": [GOOD, BROKEN]})
    written = write_index(index, tmp_path / "indexes" / "mvtec.json")
    back = read_index(written)
    # Absolute, not "../data/...": an index refuses paths that leave its root (issue 17 item 3).
    assert back.samples()[0].img_path == (root / "bottle/test/good/000.png").as_posix()
    from vip2clip.data.validate import check_index

    check_index(back)
    for sample in back.samples():
        assert back.resolve(sample.img_path).resolve() == (root / sample.img_path.split("data/", 1)[1]).resolve()
        assert back.resolve(sample.img_path).is_file()


def test_samples_classes_and_counts(tmp_path: Path) -> None:
    index = build_index(tmp_path, {"train": [TRAIN], "test": [GOOD, BROKEN, CABLE]})
    assert index.classes() == ["bottle", "cable"]
    assert index.classes("train") == ["bottle"]
    assert index.samples("test", ["cable"]) == [CABLE]
    assert index.samples() == [GOOD, BROKEN, CABLE]
    counts = {c.cls_name: (c.normal, c.anomalous, c.masks) for c in index.counts()}
    assert counts == {"bottle": (1, 1, 1), "cable": (1, 0, 0)}
    with pytest.raises(ValueError, match=r"unknown class.*screw.*valid: bottle, cable"):
        index.samples("test", ["screw"])
    with pytest.raises(ValueError, match="no split 'val'"):
        index.samples("val")


def test_missing_index_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "meta.json")):
        read_index(tmp_path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"test": {"a": [', "invalid JSON at line 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"test": {"a": {"img_path": "x"}}}', "test/a must be a list"),
        ('{"test": {"a": [{"mask_path": ""}]}}', r"test/a\[0\]: missing or empty 'img_path'"),
        ('{"test": {"a": [{"img_path": "x", "anomaly": 2}]}}', r"test/a\[0\]: 'anomaly' must be 0 or 1"),
        ('{"test": {}, "Test": {}}', "appears twice"),
        ('{"test": 3}', "must map class names"),
    ],
)
def test_malformed_index_is_a_clear_error(tmp_path: Path, content: str, pattern: str) -> None:
    file = tmp_path / "meta.json"
    file.write_text(content)
    with pytest.raises(IndexFormatError, match=pattern) as info:
        read_index(file)
    assert str(file) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    file = tmp_path / "meta.json"
    file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(IndexFormatError, match="not UTF-8"):
        read_index(file)


def test_normal_sample_never_keeps_a_mask(tmp_path: Path) -> None:
    raw = {"test": {"a": [{"img_path": "x.png", "mask_path": "x_mask.png", "anomaly": 0}]}}
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    assert read_index(tmp_path).samples() == [
        Sample(img_path="x.png", mask_path="", cls_name="a", specie_name="", anomaly=0)
    ]
