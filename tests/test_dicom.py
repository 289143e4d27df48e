"""Tests for DICOM loading (medllava.dicom through medllava.images) on real files that
ship inside pydicom, some edited here to cover cases pydicom does not bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, get_decoder, pixel_array
from pydicom.sequence import Sequence

from medllava import dicom
from medllava.images import ImageLoadError, MissingDecoderError, load_image, load_image_with_metadata

from imaging import bundled, grey, pixels


def window_by_hand(value: float, center: float, width: float) -> int:
    """PS3.3 C.11.2.1.2.1 linear window to 0..255, written out independently of the code."""
    if value <= center - 0.5 - (width - 1) / 2:
        return 0
    if value > center - 0.5 + (width - 1) / 2:
        return 255
    return int(round(((value - (center - 0.5)) / (width - 1) + 0.5) * 255))


def save_variant(tmp_path: Path, source: str, name: str, edit) -> Path:
    ds = pydicom.dcmread(bundled(source))
    edit(ds)
    path = tmp_path / name
    ds.save_as(path)
    return path


# --- DICOM: greyscale -------------------------------------------------------------------


def test_ct_hounsfield_units_and_presets():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    lung, meta = load_image_with_metadata(path, window="lung")
    lo, hi = meta["value_range"]
    assert (lo, hi) == (hu.min(), hu.max())
    assert -1024 <= lo < -500 and 500 < hi <= 3071  # air-ish to bone: a plausible CT range
    assert meta["window"] == {"source": "preset", "name": "lung", "center": -600.0, "width": 1500.0}

    r, c = np.argwhere((hu > -1300) & (hu < 100))[0]  # a pixel inside the lung window
    assert grey(lung)[r, c] == window_by_hand(hu[r, c], -600, 1500)
    r, c = np.argwhere((hu > -500) & (hu < 1300))[0]  # and one inside the bone window
    bone = load_image(path, window="bone")
    assert grey(bone)[r, c] == window_by_hand(hu[r, c], 400, 1800)
    assert not np.array_equal(pixels(lung), pixels(bone))
    assert np.array_equal(pixels(lung), pixels(load_image(path, window=(-600, 1500))))


def test_ct_without_window_falls_back_to_min_max():
    image, meta = load_image_with_metadata(bundled("CT_small.dcm"))
    assert meta["window"]["source"] == "minmax"
    values = grey(image)
    assert values.min() == 0 and values.max() == 255


def test_mr_uses_the_files_window_and_ignores_ct_presets():
    path = bundled("MR_small.dcm")
    raw = pydicom.dcmread(path).pixel_array
    image, meta = load_image_with_metadata(path)
    assert meta["window"] == {"source": "file", "center": 600.0, "width": 1600.0, "function": "LINEAR"}
    expected = np.vectorize(lambda v: window_by_hand(v, 600, 1600))(raw)
    assert np.array_equal(grey(image), expected)
    preset_image, preset_meta = load_image_with_metadata(path, window="lung")
    assert preset_meta["window"]["preset_ignored"] == "lung"
    assert np.array_equal(pixels(preset_image), pixels(image))


def test_monochrome1_is_inverted(tmp_path):
    def to_monochrome1(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"

    path = save_variant(tmp_path, "MR_small.dcm", "mono1.dcm", to_monochrome1)
    normal = grey(load_image(bundled("MR_small.dcm")))
    assert np.array_equal(grey(load_image(path)), 255 - normal)


def with_voi_lut(bits: int):
    def add_lut(ds):
        item = Dataset()
        item.add_new("LUTDescriptor", "US", [256, 0, bits])
        item.add_new("LUTData", "US", list(range(256)))  # identity, clipped at 255
        ds.VOILUTSequence = Sequence([item])

    return add_lut


def test_voi_lut_sequence_is_applied(tmp_path):
    path = save_variant(tmp_path, "MR_small.dcm", "lut.dcm", with_voi_lut(8))
    image, meta = load_image_with_metadata(path)
    assert meta["window"]["source"] == "file_voi_lut"
    assert np.array_equal(grey(image), np.minimum(pydicom.dcmread(path).pixel_array, 255))
    broken = save_variant(tmp_path, "MR_small.dcm", "lut9.dcm", with_voi_lut(9))  # 9-bit entries: not allowed
    with pytest.raises(ImageLoadError, match="cannot apply the file's LUT"):
        load_image(broken)


def test_enhanced_functional_groups_supply_rescale_and_window(tmp_path):
    def to_enhanced(ds):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = ds.RescaleSlope, ds.RescaleIntercept
        del ds.RescaleSlope, ds.RescaleIntercept
        shared = Dataset()
        shared.PixelValueTransformationSequence = Sequence([transform])
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = -600, 1500
        frame = Dataset()
        frame.FrameVOILUTSequence = Sequence([voi])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
        ds.NumberOfFrames = 1

    path = save_variant(tmp_path, "CT_small.dcm", "enhanced.dcm", to_enhanced)
    image, meta = load_image_with_metadata(path)
    assert meta["window"]["source"] == "file" and meta["window"]["center"] == -600.0
    assert meta["value_range"][0] < -500  # rescale came from the shared group: HU, not raw
    assert np.array_equal(pixels(image), pixels(load_image(bundled("CT_small.dcm"), window="lung")))


@pytest.mark.parametrize("window", [None, "lung", (40, 400)])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_lookup_table_shortcut_matches_transforming_every_pixel(name, window):
    ds = pydicom.dcmread(bundled(name))
    attrs = dicom._frame_attributes(ds, 0)
    is_ct = dicom._is_ct(ds, attrs)
    fast = dicom._grey_to_uint8(ds.pixel_array, attrs, window, is_ct)
    direct = dicom._transform(ds.pixel_array, attrs, window, is_ct)
    assert np.array_equal(fast[0], direct[0]) and fast[1:] == direct[1:]


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_lossless_encodings_match_the_uncompressed_file(name):
    assert np.array_equal(pixels(load_image(bundled(name))), pixels(load_image(bundled("MR_small.dcm"))))


def test_dicom_without_preamble_is_detected_by_content(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "mr_raw.bin"
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[:2] == b"\x08\x00"
    image, meta = load_image_with_metadata(path)
    assert meta["transfer_syntax"] == "Implicit VR Little Endian"
    assert np.array_equal(pixels(image), pixels(load_image(bundled("MR_small.dcm"))))


# --- DICOM: frames and colour -----------------------------------------------------------


def test_multiframe_default_middle_explicit_and_out_of_range():
    path = bundled("examples_ybr_color.dcm")  # 30-frame ultrasound, JPEG baseline, YBR_FULL_422
    image, meta = load_image_with_metadata(path)
    assert (meta["frame"], meta["n_frames"]) == (15, 30)
    assert np.array_equal(pixels(image), pixel_array(path, index=15))
    first = load_image(path, frame=0)
    assert np.array_equal(pixels(first), pixel_array(path, index=0))
    assert not np.array_equal(pixels(first), pixels(image))
    with pytest.raises(ImageLoadError, match=r"frame 30 requested but the file has 30 frame"):
        load_image(path, frame=30)


def test_rgb_ultrasound():
    path = bundled("examples_rgb_color.dcm")
    image, meta = load_image_with_metadata(path)
    arr = pixels(image)
    assert image.size == (320, 240) and meta["window"] is None
    assert np.array_equal(arr, pydicom.dcmread(path).pixel_array)
    assert (arr[..., 0] != arr[..., 2]).any()


def test_ybr_is_converted_to_rgb():
    ybr = pixels(load_image(bundled("SC_ybr_full_422_uncompressed.dcm")))
    rgb = pixels(load_image(bundled("SC_rgb_rle.dcm")))  # the same test pattern stored as RGB
    assert np.abs(ybr.astype(int) - rgb).max() <= 8  # chroma subsampling and rounding only


def test_palette_colour_goes_through_the_lut():
    path = bundled("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    lut = apply_color_lut(ds.pixel_array, ds)
    expected = lut if lut.dtype == np.uint8 else np.rint(lut / 257).astype(np.uint8)
    arr = pixels(load_image(path))
    assert np.array_equal(arr, expected)
    assert (arr[..., 0] != arr[..., 2]).any()


def test_16_bit_rgb_is_scaled_to_8_bit():
    path = bundled("SC_rgb_rle_16bit.dcm")
    raw = pydicom.dcmread(path).pixel_array
    assert np.array_equal(pixels(load_image(path)), np.rint(raw / 257).astype(np.uint8))


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_jpeg_ls_and_jpeg_2000_decode_or_name_the_plugin(name):
    path = bundled(name)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    if get_decoder(syntax).is_available:
        assert np.array_equal(pixels(load_image(path)), pixels(load_image(bundled("MR_small.dcm"))))
        return
    with pytest.raises(MissingDecoderError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and syntax.name in message
    assert "pylibjpeg" in message and "medllava[dicom-codecs]" in message


def test_12_bit_jpeg_that_pillow_cannot_decode_names_the_plugin():
    path = bundled("JPEG-lossy.dcm")
    decoder = get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if set(decoder.available_plugins) - {"pillow"}:
        pytest.skip("a 12-bit capable JPEG plugin is installed")
    with pytest.raises(MissingDecoderError, match="pylibjpeg-libjpeg"):
        load_image(path)


# --- De-identification ------------------------------------------------------------------

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-99887766",
    "PatientBirthDate": "19510317",
    "PatientAddress": "42 Hypothetical Lane",
    "StudyDescription": "CT chest for Jane Doe",
    "InstitutionName": "Example General Hospital",
}


@pytest.mark.parametrize("source", ["CT_small.dcm", "MR_small.dcm"])
def test_metadata_keeps_only_allow_listed_fields(tmp_path, source):
    original = pydicom.dcmread(bundled(source))
    from_file = [str(original[k].value) for k in ("PatientName", "PatientID", "PatientBirthDate") if original.get(k)]

    def add_phi(ds):
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)

    path = save_variant(tmp_path, source, "phi.dcm", add_phi)
    _, meta = load_image_with_metadata(path, dicom_descriptions=True)  # descriptions only when asked for
    dumped = json.dumps(meta)  # also proves every value is plain JSON
    for value in [*PHI.values(), *from_file]:
        assert value not in dumped
    assert "Jane" not in dumped and "doe" not in dumped.lower()
    # The description is kept for what it says about the study, with the header's identifiers cut out.
    assert meta["StudyDescription"] == "CT chest for [removed] [removed]"
    assert meta["Modality"] == original.Modality
    assert meta["Rows"] == original.Rows and isinstance(meta["Rows"], int)


# --- Bad files --------------------------------------------------------------------------


def test_truncated_dicom(tmp_path):
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(bundled("MR_truncated.dcm"))  # pixel data shorter than the header says
    cut = tmp_path / "ct_cut.dcm"
    cut.write_bytes(bundled("CT_small.dcm").read_bytes()[:1500])  # ends inside the header
    with pytest.raises(ImageLoadError, match="CT Image Storage.*truncated"):
        load_image(cut)


def test_dicom_without_pixel_data():
    path = bundled("rtplan.dcm")
    with pytest.raises(ImageLoadError, match="no pixel data.*RT Plan Storage") as info:
        load_image(path)
    assert str(path) in str(info.value)
