"""De-duplication and benchmark leakage: sha256 for exact copies, pHash for near copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from medllava.curation import dedupe
from medllava.curation.phash import HashIndex, distance, phash


def _picture(seed: int, size: int = 96) -> Image.Image:
    """A smooth random picture: structure at low frequencies, like a real image's."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def test_phash_is_stable_under_re_encoding_and_differs_between_pictures(tmp_path):
    a = _picture(1)
    a.save(tmp_path / "a.jpg", quality=60)
    rescaled = Image.open(tmp_path / "a.jpg").resize((61, 61))
    brighter = ImageEnhance.Brightness(a).enhance(1.2)
    assert distance(phash(a), phash(rescaled)) <= 4
    assert distance(phash(a), phash(brighter)) <= 4
    others = [distance(phash(a), phash(_picture(s))) for s in range(2, 12)]
    assert min(others) > 10


def test_hash_index_finds_neighbours_within_distance_only():
    index = HashIndex(max_distance=4)
    base = 0x0123456789ABCDEF
    index.add(base, "base")
    index.add(base ^ 0b1, "one-bit")
    assert index.nearest(base ^ 0b11) == ("one-bit", 1)
    assert index.nearest(base ^ 0b11110) == ("base", 4)
    assert index.nearest(base ^ 0b11111 << 20) is None  # 5 bits away from base, 6 from one-bit
    with pytest.raises(ValueError):
        HashIndex(64)


class _Args:
    def __init__(self, **kw):
        self.benchmark_images, self.max_distance, self.workers = [], 6, 1
        self.__dict__.update(kw)


def test_exact_near_duplicates_and_leakage_are_dropped(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    bench = tmp_path / "bench" / "vqa_rad"
    bench.mkdir(parents=True)
    _picture(1).save(root / "first.png")
    (root / "copy.png").write_bytes((root / "first.png").read_bytes())
    _picture(1).resize((70, 70)).save(root / "smaller.jpg", quality=70)
    _picture(2).save(root / "unique.png")
    _picture(3).save(bench / "test_001.jpg", quality=90)
    _picture(3).save(root / "leaked.png")
    (root / "broken.png").write_bytes(b"not an image")
    rows = [{"id": n, "image": f"{n}.{e}"} for n, e in
            [("first", "png"), ("copy", "png"), ("smaller", "jpg"), ("unique", "png"), ("leaked", "png"),
             ("broken", "png")]]
    rows += [{"id": "noimage", "image": None}, {"id": "escape", "image": "../outside.png"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    dedupe.run(_Args(inp=inp, image_root=root, out=out, benchmark_images=[tmp_path / "bench"]))
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == ["first", "unique", "noimage"]
    removed = {r["id"]: r for r in map(json.loads, Path(f"{out}.removed.jsonl").read_text().splitlines())}
    assert removed["copy"]["reason"] == "exact duplicate" and removed["copy"]["match"] == "first"
    assert removed["smaller"]["reason"] == "near duplicate" and removed["smaller"]["match"] == "first"
    assert removed["leaked"]["reason"] == "matches a benchmark image"
    assert removed["leaked"]["match"].endswith("test_001.jpg")
    printed = capsys.readouterr().out
    assert "skipped 2: image missing or unreadable" in printed  # broken file, path escaping the root
    assert "benchmark images fingerprinted: 1" in printed


def test_max_distance_decides_what_is_near(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _picture(1).save(root / "a.png")
    ImageEnhance.Contrast(_picture(1)).enhance(1.6).save(root / "b.png")
    d = distance(phash(Image.open(root / "a.png")), phash(Image.open(root / "b.png")))
    assert 0 < d <= 10
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "image": "a.png"}) + "\n" + json.dumps({"id": "b", "image": "b.png"}) + "\n")
    for max_distance, expected in [(d - 1, 2), (d, 1)]:
        out = tmp_path / f"out{max_distance}.jsonl"
        dedupe.run(_Args(inp=inp, image_root=root, out=out, max_distance=max_distance))
        assert len(out.read_text().splitlines()) == expected


def test_workers_give_the_same_result(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for i in range(12):
        _picture(i % 5).save(root / f"{i}.png")  # pictures 5.. repeat 0..
        rows.append({"id": str(i), "image": f"{i}.png"})
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    dedupe.run(_Args(inp=inp, image_root=root, out=one))
    dedupe.run(_Args(inp=inp, image_root=root, out=two, workers=2))
    assert [json.loads(line)["id"] for line in one.read_text().splitlines()] == ["0", "1", "2", "3", "4"]
    assert one.read_text() == two.read_text()
