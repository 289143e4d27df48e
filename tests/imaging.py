"""Helpers shared by the image and DICOM tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import data as pydicom_data

PYDICOM_FILES = Path(pydicom_data.__file__).parent / "test_files"


def bundled(name: str) -> Path:
    """A test file bundled with pydicom; never triggers pydicom's download of extra files."""
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def grey(image: Image.Image) -> np.ndarray:
    """The single channel of a greyscale image delivered as RGB."""
    arr = pixels(image)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def random_png(seed: int, size: int) -> bytes:
    """A seeded smooth random RGB image (`size` px square) as PNG bytes: figures for curation fixtures."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = coarse.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()
