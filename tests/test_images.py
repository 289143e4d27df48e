"""Tests for medllava.images: PNG, JPEG, TIFF and BMP files written here with Pillow,
format detection, bad files and options."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from medllava.images import ImageLoadError, ImageTooLargeError, load_image, load_image_with_metadata

from imaging import bundled, grey, pixels


# --- Pillow formats ---------------------------------------------------------------------

RNG = np.random.default_rng(1234)
RGB = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
SMOOTH = np.stack([*np.meshgrid(np.arange(64) * 4, np.arange(48) * 5), np.full((48, 64), 128)], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("BMP", ".bmp"), ("TIFF", ".tif")])
def test_lossless_round_trip(tmp_path, fmt, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(RGB).save(path, format=fmt)
    image, meta = load_image_with_metadata(path)
    assert np.array_equal(pixels(image), RGB)
    assert meta == {"format": fmt, "size": [64, 48], "mode": "RGB", "frame": 0, "n_frames": 1}


def test_jpeg_round_trip(tmp_path):
    path = tmp_path / "img.jpg"
    Image.fromarray(SMOOTH).save(path, quality=95)
    assert np.abs(pixels(load_image(path)).astype(int) - SMOOTH).mean() < 3


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_stretched_from_its_range(tmp_path, suffix):
    values = np.arange(48 * 64).reshape(48, 64) + 100  # 12-bit-like data
    path = tmp_path / f"grey16{suffix}"
    Image.fromarray(values.astype(np.uint16)).save(path)
    image, meta = load_image_with_metadata(path)
    out = grey(image)
    assert meta["mode"].startswith("I;16") and meta["value_range"] == [100.0, 100.0 + 48 * 64 - 1]
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert out[24, 32] == round((values[24, 32] - 100) * 255 / (48 * 64 - 1))


def test_palette_grey_and_alpha_become_rgb(tmp_path):
    Image.fromarray(RGB).convert("P").save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert np.array_equal(pixels(load_image(tmp_path / "p.png")), expected)

    Image.fromarray(RGB[..., 0]).save(tmp_path / "l.png")
    assert np.array_equal(grey(load_image(tmp_path / "l.png")), RGB[..., 0])

    rgba = np.dstack([np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64), np.uint8)])
    rgba[:, :32, 3] = 255  # left half opaque black, right half fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    arr = pixels(load_image(tmp_path / "a.png"))
    assert (arr[:, :32] == 0).all() and (arr[:, 32:] == 255).all()


def test_multipage_tiff_frames(tmp_path):
    pages = [Image.new("L", (8, 8), v) for v in (10, 20, 30)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert grey(load_image(path))[0, 0] == 10
    image, meta = load_image_with_metadata(path, frame=2)
    assert grey(image)[0, 0] == 30 and meta["n_frames"] == 3
    with pytest.raises(ImageLoadError, match="frame 3 requested but the file has 3 frame"):
        load_image(path, frame=3)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = tmp_path / "photo.jpg"
    Image.fromarray(SMOOTH).save(path, exif=exif)
    assert load_image(path).size == (48, 64)


def test_format_comes_from_content_not_extension(tmp_path):
    png_named_dcm = tmp_path / "really_png.dcm"
    Image.fromarray(RGB).save(png_named_dcm, format="PNG")
    assert load_image_with_metadata(png_named_dcm)[1]["format"] == "PNG"
    dcm_named_png = tmp_path / "really_dicom.png"
    dcm_named_png.write_bytes(bundled("MR_small.dcm").read_bytes())
    assert load_image_with_metadata(dcm_named_png)[1]["format"] == "DICOM"


# --- Bad files --------------------------------------------------------------------------


def test_missing_empty_directory_and_text(tmp_path):
    for path, words in [
        (tmp_path / "nope.png", "no such file"),
        (tmp_path, "directory"),
    ]:
        with pytest.raises(ImageLoadError, match=words) as info:
            load_image(path)
        assert str(path) in str(info.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is a caption, not a picture\n" * 20)
    with pytest.raises(ImageLoadError, match="not an image or DICOM file"):
        load_image(text)
    assert issubclass(ImageLoadError, OSError)


@pytest.mark.parametrize("tolerant", [False, True], ids=["default", "LOAD_TRUNCATED_IMAGES"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_truncated_images_fail_whatever_pillows_global_says(tmp_path, monkeypatch, fmt, tolerant):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", tolerant)
    whole = tmp_path / f"whole.{fmt.lower()}"
    Image.fromarray(RGB).save(whole, format=fmt)
    load_image(whole)  # the complete file loads in both modes
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(cut)
    assert str(cut) in str(info.value)


def png_header_only(tmp_path: Path, width: int, height: int) -> Path:
    """A PNG signature and IHDR declaring a size, then 16 bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / f"bomb_{width}x{height}.png"
    idat = struct.pack(">I", 16) + b"IDAT" + zlib.compress(b"\0" * 64)[:16]  # start of image data only
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + idat)
    return path


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    with pytest.raises(ImageTooLargeError):
        load_image(png_header_only(tmp_path, 100_000, 100_000))
    # The file holds almost no image data, so decoding it fails as truncated; getting
    # "too large" instead shows that the size check ran first.
    bomb = png_header_only(tmp_path, 2_000, 1_000)
    with pytest.raises(ImageTooLargeError, match="2000x1000 = 2,000,000 pixels"):
        load_image(bomb, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(bomb, max_pixels=None)
    assert not isinstance(info.value, ImageTooLargeError)


def test_max_pixels_option(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(RGB).save(path)
    with pytest.raises(ImageTooLargeError, match="64x48 = 3,072 pixels"):
        load_image(path, max_pixels=3071)
    assert load_image(path, max_pixels=3072).size == (64, 48)
    with pytest.raises(ImageTooLargeError):
        load_image(bundled("MR_truncated.dcm"), max_pixels=1000)  # checked before decoding


@pytest.mark.parametrize(
    "options",
    [{"window": "lungs"}, {"window": (40, 0)}, {"window": (1, 2, 3)}, {"frame": -1}, {"max_pixels": 0}],
)
def test_bad_options_are_value_errors(options):
    with pytest.raises(ValueError):
        load_image(bundled("CT_small.dcm"), **options)
