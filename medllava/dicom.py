"""DICOM to 8-bit RGB the way a radiology viewer shows it.

The pixel pipeline follows the DICOM standard (PS3.3 C.11) using pydicom's own helpers:
decode one frame -> modality LUT (rescale to Hounsfield units for CT) -> VOI LUT or window
-> MONOCHROME1 inversion; colour data is decoded to RGB by pydicom (YBR_* converted,
PALETTE COLOR through its lookup table) and scaled to 8 bits. Enhanced multi-frame files
keep rescale and window in functional group sequences; those are honoured per frame.

The header metadata returned with the image comes from `medllava.dicom_metadata`, which says what a
header may contribute; files declaring burned-in annotation are flagged, warned about, or refused here.
Callers use `medllava.images.load_image`; this module is its DICOM half.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from medllava.dicom_metadata import burned_in_annotation, header_metadata
from medllava.images import ImageLoadError, MissingDecoderError, check_pixels, stretch_to_uint8

# Standard CT windows as (center, width) in Hounsfield units (Radiopaedia, "Windowing (CT)").
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}

# Attributes that turn stored values into displayed grey levels, and where enhanced
# multi-frame files keep them instead (functional group macros, PS3.3 C.7.6.16).
_PIXEL_VALUE_KEYWORDS = (
    "PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "VOILUTSequence",
)
_FUNCTIONAL_GROUP_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

# Syntaxes that the `medllava[dicom-codecs]` extra (pylibjpeg + libjpeg + openjpeg) decodes.
_CODEC_EXTRA_SYNTAXES = frozenset(JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes)
_CODEC_EXTRA_HINT = (
    "`pip install 'medllava[dicom-codecs]'` installs pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg"
)

# Frames whose stored values span at most this many integers go through a lookup table.
_MAX_TABLE_ENTRIES = 1 << 16

_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError)
_TRANSFORM_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError, NotImplementedError)


class BurnedInAnnotationWarning(UserWarning):
    """A DICOM file declares identifying text burned into its pixels (BurnedInAnnotation YES)."""


class BurnedInAnnotationError(ImageLoadError):
    """A file with BurnedInAnnotation YES, refused because `exclude_burned_in` was set."""


def load_dicom(
    path: Path,
    *,
    frame: int | None,
    window: str | tuple[float, float] | None,
    max_pixels: int | None,
    force: bool,
    descriptions: bool = False,
    exclude_burned_in: bool = False,
) -> tuple[Image.Image, dict[str, Any]]:
    """Decode one frame of the DICOM file at `path` to RGB; see `medllava.images.load_image`.

    force: the file lacks the 128-byte preamble and "DICM" prefix, so pydicom must be
        told to parse it anyway.
    descriptions: also return StudyDescription and SeriesDescription, cleaned by
        `medllava.dicom_metadata.clean_description`.
    exclude_burned_in: refuse (BurnedInAnnotationError) a file whose header says identifying
        text is burned into its pixels; without it such a file loads with a BurnedInAnnotationWarning.
    """
    ds = _read(path, force)
    if burned_in_annotation(ds):
        if exclude_burned_in:
            raise BurnedInAnnotationError(
                f"{path}: BurnedInAnnotation is YES (patient identifiers may be drawn into the pixels); "
                "excluded by exclude_burned_in"
            )
        warnings.warn(
            f"{path}: BurnedInAnnotation is YES: patient identifiers may be drawn into the pixels",
            BurnedInAnnotationWarning, stacklevel=3,
        )
    n_frames = _n_frames(path, ds)
    index = n_frames // 2 if frame is None else frame
    if index >= n_frames:
        raise ImageLoadError(f"{path}: frame {index} requested but the file has {n_frames} frame(s) (0-{n_frames - 1})")
    rows, columns = int(ds.Rows), int(ds.Columns)
    check_pixels(path, columns, rows, max_pixels)
    arr, photometric, bits_stored = _decode_frame(path, ds, index)

    meta: dict[str, Any] = {"format": "DICOM", "size": [columns, rows], "frame": index, "n_frames": n_frames}
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            attrs = _frame_attributes(ds, index)
            grey, meta["window"], meta["value_range"] = _grey_to_uint8(arr, attrs, window, _is_ct(ds, attrs))
            if photometric == "MONOCHROME1":
                grey = 255 - grey  # MONOCHROME1 shows low values bright
            image = Image.fromarray(grey).convert("RGB")
        else:
            image = Image.fromarray(_colour_to_uint8(path, arr, photometric, bits_stored, ds))
            meta["window"] = None
    except _TRANSFORM_ERRORS as e:
        # A malformed LUT or rescale element in the header, found only when applied.
        raise ImageLoadError(f"{path}: cannot apply the file's LUT or rescale ({type(e).__name__}: {e})") from e
    meta.update(header_metadata(ds, descriptions))
    return image, meta


class _CappedReads:
    """A binary file whose `read(n)` never asks for more than the bytes left in it. pydicom reads an
    element by its declared length, and a corrupt length declaring gigabytes allocates that much before
    the read comes up short."""

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n is None or n < 0 or n > left else n)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _read(path: Path, force: bool) -> Dataset:
    """Parse the file (pixel bytes included, undecoded) and check it holds an image."""
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(_CappedReads(f, os.fstat(f.fileno()).st_size), force=force)
    except _READ_ERRORS as e:
        raise ImageLoadError(f"{path}: not a readable DICOM file ({e})") from e
    if not any(k in ds for k in _PIXEL_DATA_KEYWORDS):
        raise ImageLoadError(_no_pixel_data_message(path, ds))
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise ImageLoadError(f"{path}: DICOM pixel data without {', '.join(missing)} in the header")
    if not ds.file_meta.get("TransferSyntaxUID"):
        # Files without file meta (raw datasets) say nothing about their encoding except
        # through how pydicom had to parse them.
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _no_pixel_data_message(path: Path, ds: Dataset) -> str:
    sop = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    kind = UID(sop).name if sop else "unknown"
    if "Image" in kind or "Rows" in ds:
        return f"{path}: DICOM {kind} object without pixel data: the file is probably truncated"
    return f"{path}: DICOM file has no pixel data (it is a {kind} object, not an image)"


def _n_frames(path: Path, ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        raise ImageLoadError(f"{path}: invalid NumberOfFrames {ds.get('NumberOfFrames')!r}") from None


def _decode_frame(path: Path, ds: Dataset, index: int) -> tuple[np.ndarray, str, int]:
    """Decode only frame `index`: (rows, columns) or (rows, columns, 3), its photometric
    interpretation after decoding (YBR_* arrive as RGB), and bits stored."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        message = f"{path}: pydicom has no decoder for the transfer syntax '{syntax.name}' ({syntax})"
        raise ImageLoadError(message) from None
    if not decoder.is_available:
        raise MissingDecoderError(_missing_decoder_message(path, syntax, decoder.missing_dependencies))
    try:
        arr, props = decoder.as_array(ds, index=index)
    except RuntimeError as e:
        # Every installed plugin failed (e.g. Pillow and 12-bit JPEG); pylibjpeg may not.
        if syntax in _CODEC_EXTRA_SYNTAXES and any(d.startswith("pylibjpeg") for d in decoder.missing_dependencies):
            raise MissingDecoderError(_missing_decoder_message(path, syntax, decoder.missing_dependencies, e)) from e
        raise ImageLoadError(f"{path}: cannot decode '{syntax.name}' pixel data ({e})") from e
    except (ValueError, AttributeError, KeyError, TypeError, EOFError) as e:
        raise ImageLoadError(f"{path}: pixel data is truncated or does not match the header ({e})") from e
    return arr, str(props["photometric_interpretation"]), int(props["bits_stored"])


def _missing_decoder_message(path: Path, syntax: UID, options: list[str], failure: Exception | None = None) -> str:
    message = f"{path}: pixel data is compressed as '{syntax.name}' ({syntax}) and no installed plugin decodes it"
    if failure is not None:
        message += f" ({' '.join(str(failure).split())})"
    message += ". Install one of: " + "; ".join(options)
    if syntax in _CODEC_EXTRA_SYNTAXES:
        message += f". {_CODEC_EXTRA_HINT}"
    return message


def _frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The attributes that map frame `index` to grey levels, wherever the file keeps them.

    Top level first, then the shared functional groups, then the frame's own group, each
    overriding the last, as enhanced multi-frame CT and MR files lay them out.
    """
    attrs = Dataset()
    for keyword in _PIXEL_VALUE_KEYWORDS:
        if keyword in ds:
            attrs.add(ds[keyword])
    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for macro in _FUNCTIONAL_GROUP_MACROS:
            if group.get(macro):
                for element in group[macro][0]:
                    attrs.add(element)
    # LUTs stored as OW are read with the file's byte order.
    attrs.file_meta = ds.file_meta
    return attrs


def _is_ct(ds: Dataset, attrs: Dataset) -> bool:
    return ds.get("Modality") == "CT" or attrs.get("RescaleType") == "HU"


def _grey_to_uint8(
    arr: np.ndarray, attrs: Dataset, window: str | tuple[float, float] | None, is_ct: bool
) -> tuple[np.ndarray, dict[str, Any], list[float]]:
    """Modality LUT then VOI on a (rows, columns) frame; see `_transform`.

    Integer pixels take a shortcut: the grey shown depends only on the stored value, so
    each distinct stored value is transformed once and the frame is indexed through the
    result. On a 2048x2048 CT that is several times faster than transforming every pixel,
    with identical output.
    """
    if arr.dtype.kind in "iu":
        lo = int(arr.min())
        span = int(arr.max()) - lo + 1
        if span <= min(arr.size, _MAX_TABLE_ENTRIES):
            offsets = np.subtract(arr, lo, dtype=np.intp)
            present = np.zeros(span, dtype=bool)
            present[offsets] = True
            stored = (np.flatnonzero(present) + lo).astype(arr.dtype)
            grey, info, value_range = _transform(stored, attrs, window, is_ct)
            table = np.zeros(span, dtype=np.uint8)
            table[present] = grey
            return table[offsets], info, value_range
    return _transform(arr, attrs, window, is_ct)


def _transform(
    arr: np.ndarray, attrs: Dataset, window: str | tuple[float, float] | None, is_ct: bool
) -> tuple[np.ndarray, dict[str, Any], list[float]]:
    """Modality LUT then VOI: returns (uint8 grey, what window was applied, value range).

    The value range is that of the modality LUT output: Hounsfield units for CT.
    """
    values = apply_modality_lut(arr, attrs)
    value_range = [float(np.min(values)), float(np.max(values))]
    if window is not None and not isinstance(window, str):
        center, width = float(window[0]), float(window[1])
        return _apply_window(values, center, width, "LINEAR"), _window_info("explicit", center, width), value_range
    applied: dict[str, Any] = {}
    if isinstance(window, str):
        if is_ct:
            center, width = WINDOW_PRESETS[window]
            info = _window_info("preset", center, width, name=window)
            return _apply_window(values, center, width, "LINEAR"), info, value_range
        # Presets are Hounsfield windows, meaningless on MR or X-ray; show the file's own view.
        applied["preset_ignored"] = window
    grey, info = _file_voi(values, attrs)
    return grey, {**info, **applied}, value_range


def _file_voi(values: np.ndarray, attrs: Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    """The file's VOI LUT, else its first window, else a min-max stretch."""
    if attrs.get("VOILUTSequence"):
        entries, first, bits = (int(v) for v in attrs.VOILUTSequence[0].LUTDescriptor)
        # Values outside the LUT's domain take its first or last entry (PS3.3 C.11.2.1.1).
        # Clipping them here first matters: pydicom 3.0 builds LUT indices in the LUT's own
        # dtype, so an 8-bit LUT would wrap an input of 300 to 44 instead of clipping it.
        # Rounding is needed because a rescale may have turned the integers into floats.
        inputs = np.clip(np.rint(values), first, first + (entries or 65536) - 1).astype(np.int64)
        out = apply_voi_lut(inputs, attrs, prefer_lut=True)
        top = 2**bits - 1
        grey = np.rint(np.clip(out, 0, top) * (255.0 / top)).astype(np.uint8)
        return grey, {"source": "file_voi_lut", "bits": bits}
    center, width = _first(attrs.get("WindowCenter")), _first(attrs.get("WindowWidth"))
    if center is not None and width is not None:
        function = str(attrs.get("VOILUTFunction") or "LINEAR").upper()
        try:
            grey = _apply_window(values, float(center), float(width), function)
            return grey, _window_info("file", float(center), float(width), function=function)
        except ValueError as e:
            reason = f"file window unusable ({e})"  # e.g. width 0: fall through to min-max
    else:
        reason = "file has no window"
    grey, (lo, hi) = stretch_to_uint8(values)
    return grey, {"source": "minmax", "min": lo, "max": hi, "reason": reason}


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window `values` to uint8 with pydicom's implementation of PS3.3 C.11.2.1.2.

    pydicom scales its output to the range of the dataset it is given, so it gets a
    minimal dataset that declares unsigned 8-bit output and no rescale.
    """
    spec = Dataset()
    spec.PhotometricInterpretation = "MONOCHROME2"
    spec.BitsStored = 8
    spec.PixelRepresentation = 0
    spec.WindowCenter = center
    spec.WindowWidth = width
    spec.VOILUTFunction = function
    out = apply_windowing(values, spec)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _window_info(source: str, center: float, width: float, **extra: Any) -> dict[str, Any]:
    return {"source": source, "center": center, "width": width, **extra}


def _first(value: Any) -> Any:
    """First of a multi-valued element; None for absent or empty."""
    if isinstance(value, MultiValue):
        return value[0] if len(value) else None
    return None if value in (None, "") else value


def _colour_to_uint8(path: Path, arr: np.ndarray, photometric: str, bits_stored: int, ds: Dataset) -> np.ndarray:
    """RGB or PALETTE COLOR frame -> (rows, columns, 3) uint8."""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits_stored = 8 * arr.dtype.itemsize  # palette entries are 8- or 16-bit, full range
    elif photometric != "RGB":
        raise ImageLoadError(f"{path}: unsupported photometric interpretation {photometric!r}")
    if bits_stored <= 8:
        return arr.astype(np.uint8, copy=False)
    return np.rint(arr * (255.0 / (2**bits_stored - 1))).astype(np.uint8)
