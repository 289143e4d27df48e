"""Fuzzing the image loader: a few hundred corrupted PNG, JPEG, 16-bit TIFF and DICOM files (truncations,
bit flips, random bytes, headers declaring huge sizes) each either load as an RGB image or are refused with
an `ImageLoadError` whose message is one line naming the file. None raises anything else, and the whole
run stays inside a fixed address-space budget (a child process under RLIMIT_AS)."""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from fuzzing import BUDGET_BYTES, mutate
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGES = REPO / "medllava" / "assets" / "demo" / "images"
CASES_PER_SEED = 40


def seeds() -> dict[str, bytes]:
    """Valid files of each kind the loader reads, small enough to mutate by the hundred."""
    grey16 = np.linspace(0, 4000, 64 * 48, dtype=np.uint16).reshape(48, 64)
    png16, tiff16, png = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(grey16).save(png16, format="PNG")
    Image.fromarray(grey16).save(tiff16, format="TIFF")
    Image.new("RGB", (40, 30), (90, 20, 200)).save(png, format="PNG")
    return {
        "photo.jpg": (DEMO_IMAGES / "synpic100132.jpg").read_bytes(),
        "grey16.png": png16.getvalue(),
        "grey16.tif": tiff16.getvalue(),
        "rgb.png": png.getvalue(),
        "ct.dcm": Path(get_testdata_file("CT_small.dcm")).read_bytes(),
    }


def huge_png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` pixels, followed by a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def huge_dicom(seed: bytes, rows: int, columns: int) -> bytes:
    """The DICOM seed with its Rows and Columns (US, explicit little endian) rewritten."""
    data = bytearray(seed)
    for tag, value in ((b"\x28\x00\x10\x00", rows), (b"\x28\x00\x11\x00", columns)):
        at = data.find(tag)
        if at >= 0:
            data[at + 8:at + 10] = struct.pack("<H", value)
    return bytes(data)


def write_cases(folder: Path) -> list[Path]:
    rng = random.Random(20261206)
    files = []
    for name, data in seeds().items():
        for i in range(CASES_PER_SEED):
            path = folder / f"{i:03d}_{name}"
            path.write_bytes(mutate(data, rng))
            files.append(path)
    dicom = seeds()["ct.dcm"]
    for i, (w, h) in enumerate([(1 << 20, 1 << 20), (65535, 65535), (100000, 3), (1, 2**31 - 1)]):
        files.append(folder / f"huge{i}.png")
        files[-1].write_bytes(huge_png(w, h))
    for i, (rows, columns) in enumerate([(65535, 65535), (65535, 1), (0, 512)]):
        files.append(folder / f"huge{i}.dcm")
        files[-1].write_bytes(huge_dicom(dicom, rows, columns))
    return files


CHILD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({budget}, {budget}))
    from medllava.images import ImageLoadError, load_image
    results = []
    for path in sys.argv[1:]:
        try:
            image = load_image(path)
            results.append({{"path": path, "outcome": "loaded", "mode": image.mode}})
        except ImageLoadError as e:
            results.append({{"path": path, "outcome": "refused", "message": str(e)}})
        except BaseException as e:
            results.append({{"path": path, "outcome": "crashed", "message": f"{{type(e).__name__}}: {{e}}"}})
    print(json.dumps(results))
""")


def test_corrupted_images_load_or_are_refused_in_one_line_within_a_memory_budget(tmp_path):
    files = write_cases(tmp_path)
    assert len(files) >= 200
    proc = subprocess.run([sys.executable, "-c", CHILD.format(budget=BUDGET_BYTES), *map(str, files)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) == len(files)
    crashed = [r for r in results if r["outcome"] == "crashed"]
    assert not crashed, crashed[:5]
    refused = [r for r in results if r["outcome"] == "refused"]
    assert all(r["path"] in r["message"] and "\n" not in r["message"] for r in refused), refused[:5]
    assert all(r["mode"] == "RGB" for r in results if r["outcome"] == "loaded")
    # The fuzzing reaches both sides: some damage is survivable, most is not.
    assert len(refused) > len(files) // 3 and len(refused) < len(files)
    assert {r["outcome"] for r in results if "huge" in r["path"]} == {"refused"}


@pytest.mark.parametrize("name", ["grey16.png", "ct.dcm"])
def test_the_seeds_themselves_load(tmp_path, name):
    from medllava.images import load_image

    path = tmp_path / name
    path.write_bytes(seeds()[name])
    assert load_image(path).mode == "RGB"
