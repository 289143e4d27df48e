"""Image fingerprints for de-duplication: sha256 of the file and a 64-bit DCT perceptual hash.

The perceptual hash is the classic pHash: grey 32x32 thumbnail, 2-D DCT, the 8x8 lowest
frequencies, one bit per coefficient above their median. Re-encoding, rescaling and mild
contrast changes move few bits; different pictures differ in about half. Written here on
numpy/scipy (already dependencies) rather than adding a package for forty lines.

`HashIndex` finds stored hashes within Hamming distance d of a query without comparing against
all of them: the 64 bits are cut into d + 1 bands, and two hashes within distance d agree on
at least one whole band (pigeonhole), so only hashes sharing a band value are compared.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_BITS = 64


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash of a PIL image, as an int."""
    grey = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coeffs = dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")[:8, :8]
    bits = (coeffs > np.median(coeffs)).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class HashIndex:
    """Stored (hash, key) pairs, queried for the nearest stored hash within `max_distance`."""

    def __init__(self, max_distance: int):
        if not 0 <= max_distance < HASH_BITS:
            raise ValueError(f"max distance must be in [0, {HASH_BITS - 1}], got {max_distance}")
        self.max_distance = max_distance
        n = max_distance + 1
        edges = [round(i * HASH_BITS / n) for i in range(n + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self._tables: list[dict[int, list[tuple[int, int, str]]]] = [{} for _ in self._bands]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, value: int, key: str) -> None:
        for table, (shift, mask) in zip(self._tables, self._bands):
            table.setdefault((value >> shift) & mask, []).append((value, self._size, key))
        self._size += 1

    def nearest(self, value: int) -> tuple[str, int] | None:
        """(key, distance) of the closest stored hash within max_distance; the earliest added on ties."""
        best: tuple[int, int, str] | None = None
        for table, (shift, mask) in zip(self._tables, self._bands):
            for stored, seq, key in table.get((value >> shift) & mask, ()):
                d = distance(value, stored)
                if d <= self.max_distance and (best is None or (d, seq) < best[:2]):
                    best = (d, seq, key)
        return (best[2], best[0]) if best else None
