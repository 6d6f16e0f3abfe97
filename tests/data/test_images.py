"""Image and mask loading across file flavours, checked against pixels the tests wrote themselves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from native_trees import write_with_orientation
from PIL import Image

from vip2clip.data.images import BadImageError, decode_image_bytes, image_size, load_image, load_mask, to_rgb

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


def test_rgb_png_is_returned_unchanged(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), RGB)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = RGB[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "g.png")), np.repeat(gray[..., None], 3, axis=2))


def test_palette_image_uses_its_palette(tmp_path: Path) -> None:
    indices = RNG.integers(0, 4, size=(10, 12), dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 0], [10, 20, 30]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.png")), palette[indices])


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    alpha = RNG.integers(0, 256, size=(20, 30, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([RGB, alpha], axis=2)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "a.png")), RGB)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    pixels = np.asarray(load_image(tmp_path / "d.png"))
    np.testing.assert_array_equal(pixels[..., 0], [[0, 1, 100, 255]])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_sixteen_bit_tiff(tmp_path: Path) -> None:
    levels = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "d.tif")
    expected = np.rint(levels.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "d.tif"))[..., 1], expected)


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "c.jpg")
    image = load_image(tmp_path / "c.jpg")
    assert image.mode == "RGB" and image.size == (30, 20)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated", "folder"])
def test_bad_files_raise_bad_image_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"not an image at all" * 10)
    elif kind == "truncated":
        Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "folder":
        path.mkdir()
    for loader in (load_image, load_mask):
        with pytest.raises(BadImageError) as info:
            loader(path)
        assert info.value.path == path
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_image_size_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.fromarray(RNG.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])  # pixels cut off, header intact
    assert image_size(path) == (48, 64)
    with pytest.raises(BadImageError):
        load_image(path)
    with pytest.raises(BadImageError, match="no such file"):
        image_size(tmp_path / "nope.png")


def test_visa_class_index_masks_are_defects(tmp_path: Path) -> None:
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[2:5, 2:5] = 3
    indices[10, 10] = 1
    indices[12:14, 0:3] = 9
    Image.fromarray(indices).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), indices > 0)


def test_palette_mask_judged_by_colour(tmp_path: Path) -> None:
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[1:3, 1:3] = 1  # dark red: a grey conversion would round it to 0
    indices[5, 5] = 2
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 1, 0, 0, 0, 0, 128])
    image.save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), indices > 0)


def _blocky_mask() -> np.ndarray:
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:40, 20:50] = True
    mask[45:60, 5:12] = True
    return mask


def test_jpeg_mask_binarised_at_half(tmp_path: Path) -> None:
    truth = _blocky_mask()
    Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).save(tmp_path / "m.jpg", quality=60)
    decoded = np.asarray(Image.open(tmp_path / "m.jpg").convert("L"))
    assert ((decoded > 0) & ~truth).any(), "the test needs JPEG noise outside the mask to mean anything"
    mask = load_mask(tmp_path / "m.jpg")
    np.testing.assert_array_equal(mask, decoded > 127)
    assert (mask == truth).mean() > 0.99


def test_jpeg_mask_detected_by_content_not_suffix(tmp_path: Path) -> None:
    truth = _blocky_mask()
    Image.fromarray(np.where(truth, 255, 0).astype(np.uint8)).save(tmp_path / "m.png", format="JPEG", quality=60)
    decoded = np.asarray(Image.open(tmp_path / "m.png").convert("L"))
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), decoded > 127)


@pytest.mark.parametrize(("suffix", "high"), [(".bmp", 255), (".tif", 1), (".png", 255), (".tiff", 255)])
def test_lossless_masks_any_nonzero(tmp_path: Path, suffix: str, high: int) -> None:
    truth = _blocky_mask()
    Image.fromarray(np.where(truth, high, 0).astype(np.uint8)).save(tmp_path / f"m{suffix}")
    np.testing.assert_array_equal(load_mask(tmp_path / f"m{suffix}"), truth)


def test_rgb_one_bit_and_sixteen_bit_masks(tmp_path: Path) -> None:
    truth = _blocky_mask()
    colour = np.zeros((64, 64, 3), dtype=np.uint8)
    colour[truth, 2] = 200  # blue only
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    Image.fromarray(truth).save(tmp_path / "bit.png")
    Image.fromarray(np.where(truth, 1, 0).astype(np.uint16)).save(tmp_path / "deep.png")
    for name in ("rgb.png", "bit.png", "deep.png"):
        mask = load_mask(tmp_path / name)
        assert mask.dtype == bool and mask.shape == (64, 64)
        np.testing.assert_array_equal(mask, truth)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_exif_orientation_is_applied_like_a_photo_viewer(tmp_path: Path, suffix: str) -> None:
    # Orientation 6: the stored pixels are shown rotated 90 degrees clockwise.
    path = write_with_orientation(RGB, tmp_path / f"portrait{suffix}", 6)
    stored = RGB if suffix != ".jpg" else np.asarray(Image.open(path).convert("RGB"))  # JPEG: as compressed
    shown = np.rot90(stored, k=-1)
    assert image_size(path) == (20, 30)  # (width, height) as displayed: the stored 30x20 turned upright
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (30, 20, 3)
    np.testing.assert_array_equal(loaded, shown)
    np.testing.assert_array_equal(np.asarray(decode_image_bytes(path.read_bytes())), shown)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.open(path))), shown)
    mask = write_with_orientation((RGB[..., 0] > 128).astype(np.uint8) * 255, tmp_path / "mask.png", 6)
    np.testing.assert_array_equal(load_mask(mask), np.rot90(RGB[..., 0] > 128, k=-1))


def test_upload_decoding_refuses_what_it_cannot_use() -> None:
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    for data, problem in ((b"", "empty"), (b"plain text", "not an image"), (truncated, "damaged")):
        with pytest.raises(BadImageError, match=f"upload: {problem}"):
            decode_image_bytes(data)
    with pytest.raises(BadImageError, match="30x20 pixels; the limit is 100"):
        decode_image_bytes(buffer.getvalue(), max_pixels=100)
    assert decode_image_bytes(buffer.getvalue(), max_pixels=600).size == (30, 20)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", np.array([[0, 65535, 32768]], np.uint16), [0, 255, 128]),
        ("I", np.array([[0, 65535, 32768]], np.int32), [0, 255, 128]),
        ("F", np.array([[0.0, 1.0, 0.5]], np.float32), [0, 255, 128]),
    ],
)
def test_one_rule_for_high_bit_depth_files_and_pil_images(tmp_path: Path, mode: str, values, expected) -> None:
    """Files and PIL images given directly (the Predictor's inputs) are converted by the same rule."""
    image = Image.fromarray(values)
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(image))[0, :, 0], expected)
    if mode == "I;16":  # PNG stores neither 32-bit integer nor float images
        image.save(tmp_path / "deep.png")
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.png"))[0, :, 0], expected)


def _float_image(values: np.ndarray) -> Image.Image:
    image = Image.fromarray(values.astype(np.float32))
    assert image.mode == "F"
    return image


@pytest.mark.parametrize(
    ("special", "problem"),
    [
        (np.nan, "1 of 64 pixels are NaN or infinite (F image): it cannot be judged"),
        (np.inf, "1 of 64 pixels are NaN or infinite (F image): it cannot be judged"),
        (-0.25, "F image with negative pixel values (lowest -0.25)"),
    ],
)
def test_float_tiff_with_nan_inf_or_negative_pixels_is_refused_naming_the_file(
    tmp_path: Path, special: float, problem: str
) -> None:
    """One NaN pixel made the whole image black (max() is NaN: the 16-bit branch), and it was judged "normal"."""
    values = np.full((8, 8), 0.5)
    values[3, 4] = special
    path = tmp_path / "float.tif"
    _float_image(values).save(path)
    with pytest.raises(BadImageError, match="float.tif: " + problem.replace("(", r"\(").replace(")", r"\)")):
        load_image(path)
    with pytest.raises(BadImageError, match="upload: "):
        decode_image_bytes(path.read_bytes())
    with pytest.raises(BadImageError, match=r"^image: "):
        to_rgb(Image.open(path))
    with pytest.raises(ValueError, match="NaN or infinite" if special != -0.25 else r"values in \[0, 1\]"):
        to_rgb(values)


@pytest.mark.parametrize(("level", "grey"), [(0.5, 128), (0.0, 0), (1.0, 255), (257.0, 1), (70000.0, 255)])
def test_float_images_of_equal_values_follow_the_documented_scale(level: float, grey: int) -> None:
    pixels = np.asarray(to_rgb(_float_image(np.full((4, 5), level))))
    assert pixels.shape == (4, 5, 3) and (pixels == grey).all()


def test_float_array_outside_unit_range_is_refused_not_clipped() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\], got 0..1.5"):
        to_rgb(np.array([[0.0, 1.5]]))


@pytest.mark.parametrize(("suffix", "kind"), [(".gif", "animated GIF"), (".webp", "animated WEBP"),
                                              (".tif", "multi-page TIFF"), (".png", "animated PNG")])  # fmt: skip
def test_images_of_several_frames_are_refused_with_their_frame_count(tmp_path: Path, suffix: str, kind: str) -> None:
    """Only the first frame was judged, silently."""
    frames = [Image.fromarray(np.full((16, 16, 3), level, np.uint8)) for level in (0, 120, 240)]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(BadImageError, match=f"anim{suffix}: {kind} image with 3 frames: only single images"):
        load_image(path)
    frames[0].save(tmp_path / f"one{suffix}")  # one frame: fine
    assert load_image(tmp_path / f"one{suffix}").size == (16, 16)
