"""Helpers shared by the fuzz tests: one random corruption of a file's bytes, and the memory budget a
child process fuzzed inputs run in."""

from __future__ import annotations

import random

# Address space of a child process that loads fuzzed inputs: Python, numpy, Pillow, pydicom and the files.
BUDGET_BYTES = 1536 * 2**20


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(("truncate", "flip", "flip_many", "random_tail", "random"))
    if kind == "truncate":
        return data[:rng.randrange(len(data))]
    if kind in ("flip", "flip_many"):
        out = bytearray(data)
        for _ in range(1 if kind == "flip" else rng.randint(2, 64)):
            at = rng.randrange(len(out))
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "random_tail":
        cut = rng.randrange(len(data))
        return data[:cut] + rng.randbytes(rng.randint(1, 4096))
    return rng.randbytes(rng.randint(1, 4096))
