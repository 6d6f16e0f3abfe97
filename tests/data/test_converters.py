"""Every converter on a small tree in its native layout, through the CLI, against the exact expected index."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from native_trees import (
    build_ksdd_raw,
    build_mvtec_class,
    build_visa,
    write_dagm_labels,
    write_image,
    write_images,
    write_mask,
)
from PIL import Image

from vip2clip.cli import main
from vip2clip.data.images import load_image, load_mask
from vip2clip.data.index import Sample, read_index
from vip2clip.data.registry import DATASETS, resolve_index


def run_convert(capsys, dataset: str, root: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["convert", dataset, "--root", str(root), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def totals(out: str) -> tuple[int, int, int]:
    match = re.search(r"^total: (\d+) normal, (\d+) anomalous, (\d+) masks$", out, re.MULTILINE)
    assert match, out
    return tuple(int(g) for g in match.groups())


def S(img: str, mask: str, cls: str, specie: str, anomaly: int) -> Sample:
    return Sample(img_path=img, mask_path=mask, cls_name=cls, specie_name=specie, anomaly=anomaly)


def test_registry_lists_all_benchmarks() -> None:
    expected = {"mvtec", "visa", "mpdd", "btad", "ksdd", "dagm", "dtd-synthetic", "headct", "brainmri", "br35h"}
    assert set(DATASETS) == expected | {"isic", "clinicdb", "colondb", "kvasir", "endo", "folder"}


def test_mvtec_exact_index_and_reported_problems(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "bottle", n_train=2, n_good=2, defects={"broken_large": 2})
    build_mvtec_class(tmp_path / "cable", n_train=0, n_good=1, defects={"bent_wire": 3})
    (tmp_path / "cable/ground_truth/bent_wire/001_mask.png").unlink()  # image 001 loses its mask
    write_mask(tmp_path / "bottle/ground_truth/broken_large/007_mask.png")  # a mask without an image
    write_image(tmp_path / "notes/readme.png")  # not a class
    code, out, err = run_convert(capsys, "mvtec", tmp_path)
    assert code == 0
    index = read_index(tmp_path / "meta.json")
    gt = "ground_truth"
    assert index.splits["test"] == {
        "bottle": [
            S("bottle/test/good/000.png", "", "bottle", "good", 0),
            S("bottle/test/good/001.png", "", "bottle", "good", 0),
            S(
                "bottle/test/broken_large/000.png",
                f"bottle/{gt}/broken_large/000_mask.png",
                "bottle",
                "broken_large",
                1,
            ),
            S(
                "bottle/test/broken_large/001.png",
                f"bottle/{gt}/broken_large/001_mask.png",
                "bottle",
                "broken_large",
                1,
            ),
        ],
        "cable": [
            S("cable/test/good/000.png", "", "cable", "good", 0),
            S("cable/test/bent_wire/000.png", "cable/ground_truth/bent_wire/000_mask.png", "cable", "bent_wire", 1),
            S("cable/test/bent_wire/001.png", "", "cable", "bent_wire", 1),  # reported, not shifted
            S("cable/test/bent_wire/002.png", "cable/ground_truth/bent_wire/002_mask.png", "cable", "bent_wire", 1),
        ],
    }
    assert index.splits["train"] == {
        "bottle": [S(f"bottle/train/good/00{i}.png", "", "bottle", "good", 0) for i in range(2)]
    }
    assert "bottle: 2 normal, 2 anomalous, 2 masks" in out.splitlines()
    assert "cable: 1 normal, 3 anomalous, 2 masks" in out.splitlines()
    assert totals(out) == (3, 5, 4)
    assert f"{tmp_path / 'cable/test/bent_wire/001.png'}: anomalous image without its mask" in err
    assert f"{tmp_path / 'bottle/ground_truth/broken_large/007_mask.png'}: mask without an image" in err
    assert f"{tmp_path / 'notes'}: unknown class folder" in err
    assert f"{tmp_path / 'zipper'}: class folder missing" in err


def test_strict_turns_warnings_into_errors_and_writes_nothing(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "bottle", n_train=0, n_good=1, defects={"crack": 1})
    code, _, err = run_convert(capsys, "mvtec", tmp_path, "--strict")
    assert code == 2
    assert "--strict" in err and "class folder missing" in err
    assert not (tmp_path / "meta.json").exists()


def test_mpdd_missing_classes_reported_not_fatal(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "tubes", n_train=1, n_good=2, defects={"anomalous": 2})
    code, out, err = run_convert(capsys, "mpdd", tmp_path)
    assert code == 0 and totals(out) == (2, 2, 2)
    for missing in ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate"):
        assert f"{tmp_path / missing}: class folder missing" in err


def test_dtd_accepts_both_mask_namings(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "Woven_001", n_train=1, n_good=1, defects={"bad": 2}, mask_suffix="")
    build_mvtec_class(tmp_path / "Mesh_114", n_train=1, n_good=1, defects={"bad": 1}, mask_suffix="_mask")
    code, out, _ = run_convert(capsys, "dtd-synthetic", tmp_path)
    assert code == 0 and totals(out) == (2, 3, 3)
    index = read_index(tmp_path)
    assert [s.mask_path for s in index.samples("test", ["Woven_001", "Mesh_114"]) if s.anomaly] == [
        "Woven_001/ground_truth/bad/000.png",
        "Woven_001/ground_truth/bad/001.png",
        "Mesh_114/ground_truth/bad/000_mask.png",
    ]


def test_btad_per_class_extensions_and_gapped_names(tmp_path: Path, capsys) -> None:
    base = tmp_path / "BTech_Dataset_transformed"
    for cls_name, image_ext, mask_ext in (("01", ".bmp", ".png"), ("02", ".png", ".png"), ("03", ".bmp", ".bmp")):
        write_images(base / cls_name / "train/ok", [f"0000{image_ext}"])
        write_images(base / cls_name / "test/ok", [f"{n:04d}{image_ext}" for n in (0, 3)])
        write_images(base / cls_name / "test/ko", [f"{n:04d}{image_ext}" for n in (1, 10, 12)])
        for n in (1, 10, 12):
            write_mask(base / cls_name / f"ground_truth/ko/{n:04d}{mask_ext}")
    code, out, err = run_convert(capsys, "btad", tmp_path)
    assert code == 0, err
    assert totals(out) == (6, 9, 9)
    index = read_index(tmp_path)
    assert index.samples("test", ["01"]) == [
        S("BTech_Dataset_transformed/01/test/ok/0000.bmp", "", "01", "good", 0),
        S("BTech_Dataset_transformed/01/test/ok/0003.bmp", "", "01", "good", 0),
        *(
            S(
                f"BTech_Dataset_transformed/01/test/ko/{n:04d}.bmp",
                f"BTech_Dataset_transformed/01/ground_truth/ko/{n:04d}.png",
                "01",
                "ko",
                1,
            )
            for n in (1, 10, 12)
        ),
    ]
    assert [s.mask_path[-8:] for s in index.samples("test", ["03"]) if s.anomaly] == [
        "0001.bmp",
        "0010.bmp",
        "0012.bmp",
    ]
    assert "warning" not in err


def test_visa_split_file_and_class_index_masks(tmp_path: Path, capsys) -> None:
    build_visa(
        tmp_path, {"candle": (["0000", "0001", "1000", "1001"], ["000", "001"]), "pcb1": (["0005", "0123"], ["099"])}
    )
    code, out, err = run_convert(capsys, "visa", tmp_path)
    assert code == 0, err
    assert totals(out) == (3, 3, 3)
    index = read_index(tmp_path)
    assert index.samples("test", ["candle"]) == [
        S("candle/Data/Images/Normal/1000.JPG", "", "candle", "good", 0),
        S("candle/Data/Images/Normal/1001.JPG", "", "candle", "good", 0),
        S("candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png", "candle", "anomaly", 1),
        S("candle/Data/Images/Anomaly/001.JPG", "candle/Data/Masks/Anomaly/001.png", "candle", "anomaly", 1),
    ]
    assert [s.img_path for s in index.samples("train")] == [
        "candle/Data/Images/Normal/0000.JPG",
        "candle/Data/Images/Normal/0001.JPG",
        "pcb1/Data/Images/Normal/0005.JPG",
    ]
    mask_path = index.resolve(index.samples("test", ["pcb1"])[-1].mask_path)
    assert np.asarray(Image.open(mask_path)).max() == 3  # stored as a class index, not 255
    assert load_mask(mask_path).sum() == 9  # the 3x3 box of value 3 counts as defect


def test_visa_without_split_file_puts_everything_in_test(tmp_path: Path, capsys) -> None:
    build_visa(tmp_path, {"candle": (["0000", "0001"], ["000"])})
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    code, out, err = run_convert(capsys, "visa", tmp_path)
    assert code == 0 and totals(out) == (2, 1, 1)
    assert "split file missing" in err


def _defect_crops(defects: dict[tuple[int, int], tuple[int, int]], height: int) -> set[str]:
    """Independent reference: which crops of height // 3 rows contain a defect row."""
    names = set()
    for (kos, part), (first, last) in defects.items():
        for k in range(3):
            top, bottom = k * height // 3, (k + 1) * height // 3
            if first < bottom and last >= top:
                names.add(f"kos{kos:02d}_Part{part}_{k}")
    return names


def test_ksdd_raw_derivation(tmp_path: Path, capsys) -> None:
    defects = {(1, 3): (12, 14), (2, 5): (8, 11)}  # the second straddles the boundary of crops 0 and 1 (row 10)
    build_ksdd_raw(tmp_path / "raw", n_kos=3, defects=defects, height=30)
    code, out, _ = run_convert(capsys, "ksdd", tmp_path / "raw")
    assert code == 0
    anomalous = _defect_crops(defects, 30)
    assert anomalous == {"kos01_Part3_1", "kos02_Part5_0", "kos02_Part5_1"}
    n_normal = 3 * 8 * 3 - len(anomalous)
    n_test = n_normal - (3 * n_normal) // 4  # train takes floor(75%) of the normal crops
    assert totals(out) == (n_test, 3, 3)
    index = read_index(tmp_path / "raw")
    assert index.classes() == ["electrical commutators"]
    assert {Path(s.img_path).stem for s in index.samples() if s.anomaly} == anomalous
    assert len(index.samples("train")) == (3 * n_normal) // 4
    # A crop holds exactly its rows of the original, and its mask the label's rows.
    sample = next(s for s in index.samples() if s.img_path.endswith("kos02_Part5_1.png"))
    original = np.asarray(Image.open(tmp_path / "raw/kos02/Part5.jpg"))
    np.testing.assert_array_equal(np.asarray(load_image(index.resolve(sample.img_path)))[..., 0], original[10:20])
    expected_mask = np.zeros((10, 4), dtype=bool)
    expected_mask[0:2, 0:2] = True  # label rows 8..11 -> rows 10, 11 fall in crop 1
    np.testing.assert_array_equal(load_mask(index.resolve(sample.mask_path)), expected_mask)
    # Seeded: the same seed gives the same split, another seed another split.
    first = {s.img_path for s in index.samples() if not s.anomaly}
    run_convert(capsys, "ksdd", tmp_path / "raw", "--seed", "0")
    assert {s.img_path for s in read_index(tmp_path / "raw").samples() if not s.anomaly} == first
    run_convert(capsys, "ksdd", tmp_path / "raw", "--seed", "1")
    assert {s.img_path for s in read_index(tmp_path / "raw").samples() if not s.anomaly} != first


def test_ksdd_already_derived_copy(tmp_path: Path, capsys) -> None:
    build_ksdd_raw(tmp_path / "raw", n_kos=2, defects={(1, 0): (0, 2)}, height=12)
    run_convert(capsys, "ksdd", tmp_path / "raw")
    shutil.copytree(tmp_path / "raw" / "zsad_3crop", tmp_path / "derived")
    code, out, _ = run_convert(capsys, "ksdd", tmp_path / "derived")
    assert code == 0 and totals(out) == (47 - (3 * 47) // 4, 1, 1)
    assert read_index(tmp_path / "derived").samples()[0].img_path.startswith("test/good/kos")


@pytest.mark.slow
def test_ksdd_full_size_counts_match_the_paper(tmp_path: Path, capsys) -> None:
    # 399 images (like the real set: 50 x 8 less one); 52 defective images, two of them straddling a crop
    # boundary: 54 anomalous crops, 1143 normal ones.
    height = 30
    defects = {(kos, 2): (12, 14) for kos in range(1, 51)}
    defects.update({(1, 6): (8, 11), (2, 6): (18, 21)})
    assert len(_defect_crops(defects, height)) == 54
    build_ksdd_raw(tmp_path, n_kos=50, defects=defects, height=height, missing=[(50, 7)])
    code, out, _ = run_convert(capsys, "ksdd", tmp_path)
    assert code == 0
    assert totals(out) == (286, 54, 54)


def test_dagm_labels_txt_and_missing_label(tmp_path: Path, capsys) -> None:
    test_dir = tmp_path / "Class1" / "Test"
    write_images(test_dir, [f"{n:04d}.PNG" for n in (1, 2, 3, 4)])
    write_dagm_labels(test_dir / "Label/Labels.txt", {"0001.PNG": 0, "0002.PNG": 1, "0003.PNG": 0, "0004.PNG": 1})
    write_mask(test_dir / "Label/0002_label.PNG")  # 0004's label file is missing
    train_dir = tmp_path / "Class1" / "Train"
    write_images(train_dir, ["0001.PNG", "0002.PNG"])
    write_dagm_labels(train_dir / "Label/Labels.txt", {"0001.PNG": 1, "0002.PNG": 0})
    write_mask(train_dir / "Label/0001_label.PNG")
    class2 = tmp_path / "Class2" / "Test"  # no Labels.txt: judged by the label files
    write_images(class2, ["0007.PNG", "0008.PNG"])
    write_mask(class2 / "Label/0008_label.PNG")
    code, out, err = run_convert(capsys, "dagm", tmp_path)
    assert code == 0
    index = read_index(tmp_path)
    assert index.samples("test", ["Class1", "Class2"]) == [
        S("Class1/Test/0001.PNG", "", "Class1", "good", 0),
        S("Class1/Test/0002.PNG", "Class1/Test/Label/0002_label.PNG", "Class1", "", 1),
        S("Class1/Test/0003.PNG", "", "Class1", "good", 0),
        S("Class1/Test/0004.PNG", "", "Class1", "", 1),
        S("Class2/Test/0007.PNG", "", "Class2", "good", 0),
        S("Class2/Test/0008.PNG", "Class2/Test/Label/0008_label.PNG", "Class2", "", 1),
    ]
    assert [s.anomaly for s in index.samples("train")] == [1, 0]
    assert totals(out) == (3, 3, 2)
    assert f"{test_dir / '0004.PNG'}: anomalous image without its mask" in err
    assert f"{tmp_path / 'Class3'}: class folder missing" in err


def test_headct_nested_folder_and_labels_csv(tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "head_ct/head_ct", [f"{i:03d}.png" for i in range(6)])
    (tmp_path / "labels.csv").write_text("id, hemorrhage\n0,1\n1,1\n2,1\n3,0\n4,0\n5,0\n")
    code, out, _ = run_convert(capsys, "headct", tmp_path)
    assert code == 0 and totals(out) == (3, 3, 0)
    assert read_index(tmp_path).samples() == [
        S(f"head_ct/head_ct/{i:03d}.png", "", "brain", "" if i < 3 else "good", int(i < 3)) for i in range(6)
    ]


def test_brainmri_irregular_names_and_duplicate_copy(tmp_path: Path, capsys) -> None:
    for base in (tmp_path / "brain_tumor_dataset", tmp_path):
        write_images(base / "yes", ["Y1.jpg", "Y2.JPG", "y3.jpeg", "Y10.png"])
        write_images(base / "no", ["1 no.jpeg", "no 9.png", "N2.JPG"])
    code, out, err = run_convert(capsys, "brainmri", tmp_path)
    assert code == 0 and totals(out) == (3, 4, 0)
    index = read_index(tmp_path)
    assert [s.img_path for s in index.samples()] == [
        "brain_tumor_dataset/no/1 no.jpeg",
        "brain_tumor_dataset/no/N2.JPG",
        "brain_tumor_dataset/no/no 9.png",
        "brain_tumor_dataset/yes/Y1.jpg",
        "brain_tumor_dataset/yes/Y2.JPG",
        "brain_tumor_dataset/yes/y3.jpeg",
        "brain_tumor_dataset/yes/Y10.png",
    ]
    assert "counted once" in err


def test_br35h_ignores_pred(tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "yes", ["y0.jpg", "y1.jpg", "y2.jpg"])
    write_images(tmp_path / "no", ["no0.jpg", "No1.jpg"])
    write_images(tmp_path / "pred", ["pred0.jpg", "pred1.jpg"])
    write_images(tmp_path / "Br35H-Mask-RCNN" / "TEST", ["y5.jpg"])
    code, out, err = run_convert(capsys, "br35h", tmp_path, "--strict")
    assert code == 0, err
    assert totals(out) == (2, 3, 0)
    assert not any("pred" in s.img_path for s in read_index(tmp_path).samples())


def test_isic_pairs_segmentation_masks(tmp_path: Path, capsys) -> None:
    images = tmp_path / "ISBI2016_ISIC_Part1_Test_Data"
    masks = tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth"
    write_images(images, ["ISIC_0000003.jpg", "ISIC_0000012.jpg", "ISIC_0000013.jpg"])
    for stem in ("ISIC_0000003", "ISIC_0000013"):
        write_mask(masks / f"{stem}_Segmentation.png")
    code, out, err = run_convert(capsys, "isic", tmp_path)
    assert code == 0 and totals(out) == (0, 3, 2)
    assert [s.mask_path for s in read_index(tmp_path).samples()] == [
        "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png",
        "",
        "ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000013_Segmentation.png",
    ]
    assert "ISIC_0000012.jpg: anomalous image without its mask" in err


@pytest.mark.parametrize(
    ("images", "masks", "ext"),
    [("Original", "Ground Truth", ".tif"), ("PNG/Original", "PNG/Ground Truth", ".png"), ("images", "masks", ".png")],
)
def test_clinicdb_three_layouts(tmp_path: Path, capsys, images: str, masks: str, ext: str) -> None:
    write_images(tmp_path / images, [f"{n}{ext}" for n in (1, 2, 10)])
    for n in (1, 2, 10):
        write_mask(tmp_path / masks / f"{n}{ext}")
    code, out, _ = run_convert(capsys, "clinicdb", tmp_path)
    assert code == 0 and totals(out) == (0, 3, 3)
    assert read_index(tmp_path).samples() == [
        S(f"{images}/{n}{ext}", f"{masks}/{n}{ext}", "colon", "", 1) for n in (1, 2, 10)
    ]


def test_colondb_tiff_masks(tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "images", ["1.png", "2.png"])
    write_mask(tmp_path / "masks/1.tiff")
    write_mask(tmp_path / "masks/2.tiff")
    code, out, _ = run_convert(capsys, "colondb", tmp_path)
    assert code == 0 and totals(out) == (0, 2, 2)


def test_kvasir_jpeg_masks(tmp_path: Path, capsys) -> None:
    root = tmp_path / "Kvasir-SEG"
    write_images(root / "images", ["cju0qkwl35piu0993l0dewei2.jpg", "cju0s690hkp960855tjuaqvv0.jpg"], size=(48, 40))
    for name in ("cju0qkwl35piu0993l0dewei2.jpg", "cju0s690hkp960855tjuaqvv0.jpg"):
        write_mask(root / "masks" / name, size=(48, 40), box=(8, 8, 30, 30))
    code, out, _ = run_convert(capsys, "kvasir", tmp_path)
    assert code == 0 and totals(out) == (0, 2, 2)
    sample = read_index(tmp_path).samples()[0]
    assert sample.mask_path == "Kvasir-SEG/masks/cju0qkwl35piu0993l0dewei2.jpg"
    mask = load_mask(read_index(tmp_path).resolve(sample.mask_path))
    assert abs(int(mask.sum()) - 22 * 22) < 10  # JPEG noise around the edges is not counted as defect


def test_endo_pairs_masks_by_name_and_reports_missing_ones(tmp_path: Path, capsys) -> None:
    """EndoTect 2020's download: EndoTect_2020_Segmentation_Test_Dataset/{images,masks}, paired by name whatever
    the extension; a missing mask is reported and does not shift the pairs after it (by sort order, c would get
    d's mask)."""
    root = tmp_path / "EndoTect_2020_Segmentation_Test_Dataset"
    write_images(root / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    for stem in ("a", "b", "d"):
        write_mask(root / "masks" / f"{stem}.png")
    write_mask(root / "masks/zz.png")  # a mask without an image
    code, out, err = run_convert(capsys, "endo", tmp_path)
    assert code == 0 and totals(out) == (0, 4, 3)
    prefix = "EndoTect_2020_Segmentation_Test_Dataset"
    assert read_index(tmp_path).samples() == [
        S(f"{prefix}/images/{n}.jpg", f"{prefix}/masks/{n}.png" if n != "c" else "", "colon", "", 1) for n in "abcd"
    ]
    assert "c.jpg: anomalous image without its mask" in err and "zz.png: mask without an image" in err
    assert "Endo: wrote" in out and "paper (Table 7)" not in out  # the paper gives no Endo counts
    assert main(["convert", "endo", "--root", str(tmp_path), "--strict"]) == 2


def test_endo_authors_layout_and_bad_roots(tmp_path: Path, capsys) -> None:
    """The authors' index script reads every folder beside masks/ as images, good/ as normal ones."""
    write_images(tmp_path / "polyps", ["1.jpg", "2.jpg"])
    write_images(tmp_path / "good", ["3.jpg"])
    write_mask(tmp_path / "masks/1.jpg")
    write_mask(tmp_path / "masks/2.jpg")
    code, out, _ = run_convert(capsys, "endotect", tmp_path)
    assert code == 0 and totals(out) == (1, 2, 2)
    assert read_index(tmp_path).samples()[0] == S("good/3.jpg", "", "colon", "good", 0)
    code, _, err = run_convert(capsys, "endo", tmp_path / "polyps")
    assert code == 2 and "no masks/ folder found" in err
    (tmp_path / "empty/masks").mkdir(parents=True)
    code, _, err = run_convert(capsys, "endo", tmp_path / "empty")
    assert code == 2 and "no folder of images beside masks/" in err


def test_folder_layout_single_and_multi_class(tmp_path: Path, capsys) -> None:
    single = tmp_path / "widget"
    write_images(single / "good", ["a.png", "b.png"])
    write_images(single / "scratch", ["c.png", "d.png"])
    write_mask(single / "ground_truth/scratch/c_mask.png")
    write_images(single / "dent", ["e.png"])  # no masks for this defect type: image-level only
    code, out, err = run_convert(capsys, "folder", single)
    assert code == 0 and totals(out) == (2, 3, 1)
    assert read_index(single).samples() == [
        S("good/a.png", "", "widget", "good", 0),
        S("good/b.png", "", "widget", "good", 0),
        S("dent/e.png", "", "widget", "dent", 1),
        S("scratch/c.png", "ground_truth/scratch/c_mask.png", "widget", "scratch", 1),
        S("scratch/d.png", "", "widget", "scratch", 1),
    ]
    assert "d.png: anomalous image without its mask" in err
    (single / "meta.json").unlink()
    shutil.copytree(single, tmp_path / "multi" / "gadget")
    shutil.move(single, tmp_path / "multi" / "widget")
    code, out, _ = run_convert(capsys, "folder", tmp_path / "multi")
    assert code == 0 and totals(out) == (4, 6, 2)
    assert read_index(tmp_path / "multi").classes() == ["gadget", "widget"]


def test_out_option_and_bad_root(tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "data/images", ["1.png"])
    write_mask(tmp_path / "data/masks/1.png")
    code, _, _ = run_convert(capsys, "colondb", tmp_path / "data", "--out", str(tmp_path / "idx/colon.json"))
    assert code == 0
    index = read_index(tmp_path / "idx/colon.json")
    assert index.resolve(index.samples()[0].img_path).resolve() == (tmp_path / "data/images/1.png").resolve()
    code, _, err = run_convert(capsys, "colondb", tmp_path / "nowhere")
    assert code == 2 and "dataset root not found" in err
    code, _, err = run_convert(capsys, "mvtec", tmp_path / "idx")
    assert code == 2 and "no test images found" in err
    with pytest.raises(SystemExit):
        main(["convert", "--root", str(tmp_path)])


def test_unknown_dataset_lists_valid_names(tmp_path: Path, capsys) -> None:
    code, _, err = run_convert(capsys, "imagenet", tmp_path)
    assert code == 2 and "unknown dataset 'imagenet'" in err and "mvtec" in err and "kvasir" in err


def test_resolve_index_converts_on_the_fly(tmp_path: Path) -> None:
    build_mvtec_class(tmp_path / "bottle", n_train=1, n_good=1, defects={"crack": 1})
    with pytest.raises(FileNotFoundError, match="pass --dataset NAME"):
        resolve_index(tmp_path)
    index = resolve_index(tmp_path, dataset="MVTec")
    assert (tmp_path / "meta.json").is_file()
    assert len(index.samples()) == 2
    assert resolve_index(tmp_path / "meta.json").splits == index.splits == resolve_index(tmp_path).splits
    with pytest.raises(FileNotFoundError):
        resolve_index(tmp_path / "missing")


@pytest.mark.slow  # a fresh interpreter imports torch: seconds on a loaded machine
def test_convert_as_a_real_process(tmp_path: Path) -> None:
    build_mvtec_class(tmp_path / "screw", n_train=1, n_good=2, defects={"thread_top": 2})
    command = [sys.executable, "-m", "vip2clip", "convert", "mvtec", "--root", str(tmp_path), "--check-images"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "screw: 2 normal, 2 anomalous, 2 masks" in result.stdout
    assert totals(result.stdout) == (2, 2, 2)
    assert "paper (Table 7): 467 normal, 1258 anomalous" in result.stdout
    assert f"{tmp_path / 'bottle'}: class folder missing" in result.stderr
    assert read_index(tmp_path).samples("train") == [S("screw/train/good/000.png", "", "screw", "good", 0)]


def test_check_images_reports_unreadable_files(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "screw", n_train=0, n_good=1, defects={"thread_top": 1})
    (tmp_path / "screw/test/good/000.png").write_bytes(b"broken")
    code, _, err = run_convert(capsys, "mvtec", tmp_path, "--check-images")
    assert code == 0 and f"unreadable image: {tmp_path / 'screw/test/good/000.png'}" in err
    code, _, err = run_convert(capsys, "mvtec", tmp_path, "--check-images", "--strict")
    assert code == 2


def test_one_mask_for_two_images_is_reported_and_strict_refuses(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "bottle", n_train=0, n_good=1, defects={"crack": 1})
    write_image(tmp_path / "bottle/test/crack/000.jpg")  # 000.png and 000.jpg: which one is 000_mask.png's?
    code, _, err = run_convert(capsys, "mvtec", tmp_path)
    assert code == 0
    crack = tmp_path / "bottle/test/crack"
    assert re.search(rf"{re.escape(str(crack))}/000\.(png|jpg): shares its mask 000_mask\.png with 000\.(jpg|png)", err)
    code, _, err = run_convert(capsys, "mvtec", tmp_path, "--strict")
    assert code == 2 and "shares its mask 000_mask.png" in err


def test_unknown_folders_inside_a_class_are_reported(tmp_path: Path, capsys) -> None:
    build_mvtec_class(tmp_path / "bottle", n_train=1, n_good=1, defects={"crack": 1})
    write_image(tmp_path / "bottle/extra_shots/1.png")  # not train/, test/ or ground_truth/
    write_image(tmp_path / "bottle/train/defect/1.png")  # train holds normal images only
    write_image(tmp_path / "bottle/test/crack/closeups/1.png")  # a folder inside a defect folder
    code, _, err = run_convert(capsys, "mvtec", tmp_path)
    assert code == 0
    assert f"{tmp_path / 'bottle/extra_shots'}: unexpected folder in class bottle; ignored" in err
    assert f"{tmp_path / 'bottle/train/defect'}: unexpected training folder (only good/); ignored" in err
    assert f"{tmp_path / 'bottle/test/crack/closeups'}: unexpected sub-folder in an image folder" in err
    single = tmp_path / "widget"
    write_images(single / "good", ["a.png"])
    write_images(single / "scratch/left", ["b.png"])
    write_mask(single / "ground_truth/dent/c_mask.png")
    code, _, err = run_convert(capsys, "folder", single, "--strict")
    assert code == 2
    assert f"{single / 'scratch/left'}: unexpected sub-folder in an image folder" in err
    assert f"{single / 'ground_truth/dent'}: unexpected mask folder (no defect folder)" in err
    dagm = tmp_path / "dagm"
    write_images(dagm / "Class1/Test", ["0001.PNG"])
    write_images(dagm / "Class1/Test/Label", [])
    write_images(dagm / "Class1/Extra", ["x.PNG"])
    code, _, err = run_convert(capsys, "dagm", dagm)
    assert code == 0 and f"{dagm / 'Class1/Extra'}: unexpected folder in class Class1; ignored" in err


@pytest.mark.parametrize(("dataset", "wrapper"), [("mvtec", "mvtec_anomaly_detection"), ("dagm", "DAGM_KaggleUpload")])
def test_a_single_wrapping_folder_is_descended_into(tmp_path: Path, capsys, dataset: str, wrapper: str) -> None:
    inner = tmp_path / wrapper
    if dataset == "mvtec":
        build_mvtec_class(inner / "bottle", n_train=1, n_good=1, defects={"crack": 1})
    else:
        write_images(inner / "Class1/Test", ["0001.PNG", "0002.PNG"])
        write_dagm_labels(inner / "Class1/Test/Label/Labels.txt", {"0001.PNG": 0, "0002.PNG": 1})
        write_mask(inner / "Class1/Test/Label/0002_label.PNG")
    (tmp_path / "README.txt").write_text("downloaded from ...")  # files beside the folder do not matter
    code, out, err = run_convert(capsys, dataset, tmp_path)
    assert code == 0, err
    assert f"note: {tmp_path} holds only the folder {wrapper}/ (as archives unpack): converted {inner}" in err
    index = read_index(tmp_path / "meta.json")  # written where the user pointed, paths through the wrapper
    assert totals(out) == (1, 1, 1)
    for sample in index.samples():
        assert sample.img_path.startswith(f"{wrapper}/") and index.resolve(sample.img_path).is_file()
        assert not sample.mask_path or index.resolve(sample.mask_path).is_file()
    (tmp_path / "meta.json").unlink()
    write_images(tmp_path / "other", ["1.png"])  # two folders: no wrapper to descend into
    code, _, err = run_convert(capsys, dataset, tmp_path)
    assert code == 2 and "holds only the folder" not in err
