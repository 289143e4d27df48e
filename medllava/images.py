"""Load any image the toolkit meets (PNG, JPEG, TIFF, BMP and other Pillow formats, or DICOM)
as an 8-bit RGB `PIL.Image.Image`, with one entry point and one error type.

The format is detected from the file's content, not its extension: DICOM by "DICM" at byte
128 or, for files without a preamble, by a first element in group 0002 or 0008; everything
else goes to Pillow. DICOM decoding, windowing and de-identified metadata live in
`medllava.dicom`, imported only when a DICOM file is seen so that loading PNGs never pays
for importing pydicom.

Every failure on a bad file raises `ImageLoadError` (an `OSError`) whose message starts with
the path, so a data loader can catch one type, count it and move on.
"""

from __future__ import annotations

import io
import numbers
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The size at which Pillow, with its default Image.MAX_IMAGE_PIXELS, refuses to open an
# image (twice that setting; between one and two times it only warns).
DEFAULT_MAX_PIXELS = 178_956_970

# Transparent pixels are laid on white: figures from papers are drawn for a white page.
_BACKGROUND = (255, 255, 255)

# Values converted to float64 at a time by `stretch_to_uint8` (8 MiB).
_STRETCH_BLOCK = 1 << 20

# Pillow plugins report corrupt data with assorted exception types (a TIFF tag of the wrong type: TypeError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


class ImageLoadError(OSError):
    """A file could not be loaded as an image; the message starts with the file's path."""


class ImageTooLargeError(ImageLoadError):
    """The image's declared size exceeds `max_pixels` (checked before any decoding)."""


class ImageOutsideRootError(ImageLoadError):
    """The path is, or passes through, a symlink that leads outside the image root."""


class MissingDecoderError(ImageLoadError):
    """A DICOM file uses a compressed transfer syntax that no installed plugin decodes."""


def load_image(
    path: str | os.PathLike,
    *,
    frame: int | None = None,
    window: str | tuple[float, float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    root: str | os.PathLike | None = None,
    dicom_descriptions: bool = False,
    exclude_burned_in: bool = False,
) -> Image.Image:
    """Load `path` as an RGB image (mode "RGB", 8 bits per channel).

    frame: which frame of a multi-frame file; default the middle frame for DICOM (the
        most representative slice of a cine or volume) and the first page otherwise.
    window: DICOM greyscale only. None uses the file's VOI LUT or window and falls back to
        the min-max of the frame; a name from `medllava.dicom.WINDOW_PRESETS` ("lung",
        "mediastinum", "bone", "brain", "abdomen") applies that CT window in Hounsfield
        units (ignored for files that are not CT); `(center, width)` applies that window
        to the modality-LUT output.
    max_pixels: refuse images larger than this (width * height of the frame decoded)
        before decoding; None disables the check. Pillow's own check still stops files
        over twice `PIL.Image.MAX_IMAGE_PIXELS`, whatever `max_pixels` says.
    root: the image root `path` must stay inside once symlinks are resolved; a path that is, or
        passes through, a symlink leading out of it is refused (`ImageOutsideRootError`).
    dicom_descriptions: DICOM only; also return StudyDescription and SeriesDescription in the
        metadata, cleaned of identifiers (`medllava.dicom_metadata.clean_description`). Off by default.
    exclude_burned_in: DICOM only; refuse files whose header says identifying text is burned into
        the pixels (BurnedInAnnotation YES) with `medllava.dicom.BurnedInAnnotationError`. Without
        it they load with a `medllava.dicom.BurnedInAnnotationWarning`.

    Greyscale, palette, alpha and high-bit-depth images are converted to RGB: alpha is
    composited on white; 16-bit and 32-bit greyscale (not DICOM) are stretched from their
    min-max range, because such files often hold 10- to 12-bit data in a 16-bit container.
    Camera photos are rotated upright from their EXIF orientation.
    """
    return load_image_with_metadata(
        path, frame=frame, window=window, max_pixels=max_pixels, root=root,
        dicom_descriptions=dicom_descriptions, exclude_burned_in=exclude_burned_in,
    )[0]


def load_image_with_metadata(
    path: str | os.PathLike,
    *,
    frame: int | None = None,
    window: str | tuple[float, float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    root: str | os.PathLike | None = None,
    dicom_descriptions: bool = False,
    exclude_burned_in: bool = False,
) -> tuple[Image.Image, dict[str, Any]]:
    """Like `load_image`, also returning a JSON-serialisable metadata dict.

    For Pillow formats: `format`, `size` ([width, height]), `mode` (as stored), `frame`,
    `n_frames`, and `value_range` when a high-bit-depth image was stretched.
    For DICOM: the same keys plus the header's coded and numeric values (see
    `medllava.dicom_metadata.METADATA_KEYWORDS`), `burned_in_annotation` (True, False or None when the
    header is silent) and what was done to the pixels (`window`, `value_range`, `transfer_syntax`).
    No patient names, IDs, dates or free text, unless `dicom_descriptions` asks for the cleaned
    descriptions.
    """
    path = Path(path)
    _check_options(frame, window, max_pixels)
    if root is not None:
        check_inside_root(path, Path(root))
    frame = None if frame is None else int(frame)
    kind = _sniff(path)
    if kind == "pillow":
        return _load_with_pillow(path, frame, max_pixels)
    from medllava import dicom

    return dicom.load_dicom(
        path, frame=frame, window=window, max_pixels=max_pixels, force=kind == "dicom-raw",
        descriptions=dicom_descriptions, exclude_burned_in=exclude_burned_in,
    )


def check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    """Raise `ImageTooLargeError` when a declared image size exceeds `max_pixels`."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{path}: image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (max_pixels); refusing to decode it"
        )


def check_inside_root(path: Path, root: Path) -> None:
    """Raise `ImageOutsideRootError` when `path`, symlinks resolved, is not inside `root`;
    see `medllava.records.symlink_escape`."""
    from medllava.records import symlink_escape

    reason = symlink_escape(path, root)
    if reason:
        raise ImageOutsideRootError(f"{path}: {reason}")


def _check_options(frame, window, max_pixels) -> None:
    """Caller mistakes are ValueErrors, raised before the file is touched."""
    if frame is not None and (not isinstance(frame, numbers.Integral) or frame < 0):
        raise ValueError(f"frame must be a non-negative int or None, got {frame!r}")
    if max_pixels is not None and (not isinstance(max_pixels, numbers.Integral) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if window is None:
        return
    if isinstance(window, str):
        from medllava.dicom import WINDOW_PRESETS

        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r}; choose one of {sorted(WINDOW_PRESETS)}")
        return
    if (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(v, numbers.Real) for v in window)
        and window[1] >= 1
    ):
        return
    raise ValueError(f"window must be a preset name or (center, width) with width >= 1, got {window!r}")


def _sniff(path: Path) -> str:
    """Return "dicom", "dicom-raw" (no preamble) or "pillow" from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read file ({e.strerror or e})") from e
    if not head:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    if head[128:132] == b"DICM":
        return "dicom"
    # A DICOM stream without preamble starts with its first tag: group 0002 (file meta) or
    # 0008 (identifying module), little- or big-endian. No Pillow format starts this way.
    if head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08") and len(head) >= 8:
        return "dicom-raw"
    return "pillow"


class _EofWatchingReader(io.BufferedReader):
    """A file reader that counts reads finding the file exhausted while `watching` is set.

    While decoding, a complete image never asks for bytes past its end; a truncated one
    does. Counting those reads detects truncation even when some other code has set
    Pillow's global `ImageFile.LOAD_TRUNCATED_IMAGES`, which makes Pillow pad silently.
    """

    watching = False
    empty_reads = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.watching and not data and size != 0:
            self.empty_reads += 1
        return data


def _load_with_pillow(path: Path, frame: int | None, max_pixels: int | None) -> tuple[Image.Image, dict]:
    with _EofWatchingReader(io.FileIO(path, "rb")) as fh:
        im = _open_with_pillow(path, fh)
        n_frames = int(getattr(im, "n_frames", 1))
        index = 0 if frame is None else frame
        if index >= n_frames:
            raise ImageLoadError(f"{path}: frame {index} requested but the file has {n_frames} frame(s)")
        try:
            if index:
                im.seek(index)
            check_pixels(path, im.width, im.height, max_pixels)
            fh.watching = True
            im.load()
            fh.watching = False
        except ImageLoadError:
            raise
        except _PIL_ERRORS as e:
            raise ImageLoadError(f"{path}: cannot decode {im.format} image (truncated or corrupt: {e})") from e
        if fh.empty_reads:
            raise ImageLoadError(f"{path}: {im.format} image is truncated (data ends before the image does)")
        mode = im.mode
        meta: dict[str, Any] = {"format": im.format, "size": [im.width, im.height], "mode": mode,
                                "frame": index, "n_frames": n_frames}
        im = ImageOps.exif_transpose(im)
    try:
        rgb, value_range = _to_rgb(im)
    except _PIL_ERRORS as e:
        raise ImageLoadError(f"{path}: cannot convert {mode} image to RGB ({e})") from e
    if value_range is not None:
        meta["value_range"] = value_range
    meta["size"] = [rgb.width, rgb.height]
    return rgb, meta


def _open_with_pillow(path: Path, fh: io.BufferedReader) -> Image.Image:
    """Read the header only; Pillow decodes pixels later, in `load()`."""
    try:
        return Image.open(fh)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{path}: over Pillow's Image.MAX_IMAGE_PIXELS limit ({e})") from e
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{path}: not an image or DICOM file (unknown format, or an image cut off inside its header)"
        ) from None
    except _PIL_ERRORS as e:
        raise ImageLoadError(f"{path}: cannot read image header (truncated or corrupt: {e})") from e


def _to_rgb(im: Image.Image) -> tuple[Image.Image, list[float] | None]:
    """Convert any Pillow mode to RGB; returns the stretched value range for high-bit grey."""
    if im.mode == "RGB":
        return im, None
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", im.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB"), None
    if im.mode.startswith("I") or im.mode == "F":
        grey, value_range = stretch_to_uint8(np.asarray(im))
        return Image.fromarray(grey).convert("RGB"), value_range
    return im.convert("RGB"), None


def stretch_to_uint8(values: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Map `values` linearly so min -> 0 and max -> 255; a constant image maps to 0.

    Returns the uint8 array (same shape) and `[min, max]` as plain floats. NaN and
    infinities (float images) are left out of the range and shown as 0.

    Memory is the input plus the uint8 output plus one block of `_STRETCH_BLOCK` values: the
    arithmetic runs block by block, because float64 copies of a whole 16-bit image under Pillow's
    pixel limit took over 2 GB.
    """
    values = np.asarray(values)
    lo, hi = _finite_range(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if lo is None or hi == lo:
        return out, [lo or 0.0, hi or 0.0]
    flat_in, flat_out = values.reshape(-1), out.reshape(-1)
    scale = 255.0 / (hi - lo)
    for start in range(0, flat_in.size, _STRETCH_BLOCK):
        block = flat_in[start:start + _STRETCH_BLOCK].astype(np.float64)
        block -= lo
        block *= scale
        block[~np.isfinite(block)] = 0.0
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        flat_out[start:start + _STRETCH_BLOCK] = block
    return out, [lo, hi]



def _finite_range(values: np.ndarray) -> tuple[float | None, float | None]:
    """(min, max) over the finite values, without a full-size copy; (None, None) when there are none."""
    if values.size == 0:
        return None, None
    if values.dtype.kind != "f":
        return float(values.min()), float(values.max())
    finite = np.isfinite(values)  # 1 byte a value: the one full-size temporary
    lo = float(np.min(values, initial=np.inf, where=finite))
    if lo == np.inf:
        return None, None
    return lo, float(np.max(values, initial=-np.inf, where=finite))
