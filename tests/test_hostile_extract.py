"""`curate extract` on hostile and broken inputs: each is skipped with a reason, never the end of a run.

Deeply nested articles, oversized or fake figures, corrupt compressed streams, packages with thousands
of articles, symbolic and hard links, member paths that climb out of the package.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from medllava.curation import article_inputs, extract, jats
from medllava.curation.jats import parse_article

XLINK = 'xmlns:xlink="http://www.w3.org/1999/xlink"'


def _args(out: Path, jats_paths=(), images_out=None, workers=1, max_image_mb=None):
    class Args:
        pass

    a = Args()
    a.jats, a.pmc15m, a.llava_med, a.images_out, a.out, a.workers = list(jats_paths), [], [], images_out, out, workers
    if max_image_mb is not None:
        a.max_image_mb = max_image_mb
    return a


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _skipped(out: Path) -> list[dict]:
    path = Path(f"{out}.skipped.jsonl")
    return _rows(path) if path.exists() else []


def _jpeg(color="red", size=16, noise=False) -> bytes:
    noisy = Image.frombytes("L", (size, size), random.Random(size).randbytes(size * size)) if noise else None
    image = noisy.convert("RGB") if noise else Image.new("RGB", (size, size), color)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png(color="blue") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def article(pmcid: int, figures=("g1",), body: str = "") -> bytes:
    """A small JATS article whose figures `<fig id=X>` show graphic `img-X`."""
    figs = "".join(f'<fig id="{f}"><label>Figure {i + 1}</label><caption><p>Caption {f}.</p></caption>'
                   f'<graphic {XLINK} xlink:href="img-{f}"/></fig>' for i, f in enumerate(figures))
    return (f'<article><front><article-meta><article-id pub-id-type="pmc">{pmcid}</article-id></article-meta>'
            f'</front><body><sec><p>See <xref ref-type="fig" rid="{figures[0] if figures else "x"}">Figure 1</xref>.'
            f"</p>{body}{figs}</sec></body></article>").encode()


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def package(path: Path, members: list[tuple], compresslevel: int = 9) -> Path:
    """A .tar.gz of (name, data[, TarInfo attributes]) members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, *kw in members:
            add(tar, name, data, **(kw[0] if kw else {}))
    path.write_bytes(gzip.compress(buf.getvalue(), compresslevel=compresslevel))
    return path


def _all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- 1. deep nesting ---------------------------------------------------------------------------

DEPTH = 5000  # far past Python's recursion limit (1000)


def _deep(kind: str) -> bytes:
    """Articles whose nesting breaks a recursive tree walk, each at a different walk."""
    n = DEPTH
    if kind == "sec":  # the figure walk
        return article(1, body="<sec>" * n + "text" + "</sec>" * n)
    if kind == "fig-in-sec":  # a figure at the bottom of the nesting: found, with its mention
        fig = f'<fig id="g1"><caption><p>Deep.</p></caption><graphic {XLINK} xlink:href="img-g1"/></fig>'
        return article(1, figures=(), body="<sec>" * n + fig + "</sec>" * n).replace(b'rid="x"', b'rid="g1"')
    if kind == "p":  # the body-paragraph walk
        return article(1, body="<p>" * n + "deep" + "</p>" * n)
    if kind == "italic-in-body":  # the mention walk
        return article(1, body="<p>" + "<italic>" * n + 'x <xref ref-type="fig" rid="g1">Fig 1</xref>.'
                       + "</italic>" * n + "</p>")
    if kind == "italic-in-caption":  # flattening a caption
        return article(1).replace(b"<p>Caption g1.</p>", b"<p>" + b"<italic>" * n + b"Cap." + b"</italic>" * n + b"</p>")
    if kind == "license":  # the licence search
        nested = "<license>" * n + "Creative Commons Attribution" + "</license>" * n
        return article(1).replace(b"</article-meta>", nested.encode() + b"</article-meta>")
    if kind == "license-ref":  # the licence search, a quadratic walk if each nested ref is flattened
        nested = "<license_ref>" * n + "https://creativecommons.org/licenses/by/4.0/" + "</license_ref>" * n
        return article(1).replace(b"</article-meta>", f"<license>{nested}</license></article-meta>".encode())
    raise ValueError(kind)


DEEP_KINDS = ["sec", "fig-in-sec", "p", "italic-in-body", "italic-in-caption", "license", "license-ref"]


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_deeply_nested_articles_parse_without_recursion(kind):
    parsed = parse_article(_deep(kind))
    assert parsed.pmcid == "PMC1" and len(parsed.figures) == 1
    fig = parsed.figures[0]
    assert fig.href == "img-g1"
    if kind == "fig-in-sec":
        assert fig.caption == "Deep." and fig.mentions == ["See Figure 1."]
    if kind == "italic-in-caption":
        assert fig.caption == "Cap."
    if kind == "italic-in-body":
        assert fig.mentions == ["See Figure 1.", "x Fig 1."]
    if kind.startswith("license"):
        assert parsed.licence == "CC BY"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_with_deeply_nested_articles_extracts_them_all(tmp_path, workers):
    folder = tmp_path / "in"
    for i, kind in enumerate(DEEP_KINDS):
        (folder / kind).mkdir(parents=True)
        (folder / kind / f"PMC{i + 10}.nxml").write_bytes(_deep(kind).replace(b">1</article-id>", f">{i + 10}</article-id>".encode()))
        (folder / kind / "img-g1.jpg").write_bytes(_jpeg())
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, [folder], images_out=tmp_path / "images", workers=workers))
    rows = _rows(out)
    assert sorted(r["pmcid"] for r in rows) == sorted(f"PMC{i + 10}" for i in range(len(DEEP_KINDS)))
    assert all(r["image"] for r in rows) and _skipped(out) == []


def test_sentence_splitting_is_linear_on_hostile_paragraphs():
    # A quadratic splitter takes ~5 s and ~60 s on these (one long word; many skipped abbreviations).
    start = time.perf_counter()
    assert len(jats.split_sentences("a" * 30_000 + " xy. Next")) == 2
    assert len(jats.split_sentences("Fig. " * 20_000 + "end")) == 1
    assert time.perf_counter() - start < 1.0


# -- the per-article guard and the article caps --------------------------------------------------

@pytest.mark.parametrize("error", [RecursionError("maximum recursion depth exceeded"), KeyError("x"),
                                   MemoryError(), AttributeError("'NoneType' object has no attribute 'tag'")])
@pytest.mark.parametrize("packaged", [False, True])
def test_an_unexpected_error_in_one_article_skips_only_that_article(tmp_path, monkeypatch, error, packaged):
    real = extract.parse_article

    def parse(data: bytes):
        if b">666<" in data:
            raise error
        return real(data)

    monkeypatch.setattr(extract, "parse_article", parse)
    folder = tmp_path / "in"
    for pmcid in (1, 666, 2):
        if packaged:
            package(folder / f"PMC{pmcid}.tar.gz", [(f"PMC{pmcid}/a.nxml", article(pmcid))])
        else:
            (folder / f"PMC{pmcid}").mkdir(parents=True)
            (folder / f"PMC{pmcid}" / "a.nxml").write_bytes(article(pmcid))
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, [folder]))
    assert [r["pmcid"] for r in _rows(out)] == ["PMC1", "PMC2"]
    (skip,) = _skipped(out)
    assert skip["reason"] == "unexpected error in the article"
    assert "PMC666" in skip["detail"] and type(error).__name__ in skip["detail"]


@pytest.mark.parametrize("packaged", [False, True])
def test_articles_over_the_size_or_element_cap_are_skipped_with_the_cap_named(tmp_path, monkeypatch, packaged):
    monkeypatch.setattr(extract, "MAX_ARTICLE_BYTES", 4096)
    monkeypatch.setattr(jats, "MAX_ELEMENTS", 500)
    big = article(7, body="<p>" + "x" * 5000 + "</p>")  # over 4 KiB
    many = article(8, body="<b/>" * 600)  # under 4 KiB, over 500 elements
    folder = tmp_path / "in"
    for pmcid, data in ((7, big), (8, many), (9, article(9))):
        if packaged:
            package(folder / f"PMC{pmcid}.tar.gz", [(f"PMC{pmcid}/a.nxml", data)])
        else:
            (folder / f"PMC{pmcid}").mkdir(parents=True)
            (folder / f"PMC{pmcid}" / "a.nxml").write_bytes(data)
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, [folder]))
    assert [r["pmcid"] for r in _rows(out)] == ["PMC9"]
    skips = _skipped(out)
    assert [s["reason"] for s in skips] == ["article too large"] * 2
    assert "PMC7" in skips[0]["detail"] and "0.00390625 MiB limit" in skips[0]["detail"]
    assert "PMC8" in skips[1]["detail"] and "500" in skips[1]["detail"]


# -- 2. package members: size cap, image check, corrupt streams -----------------------------------

class Zeros(io.RawIOBase):
    """`size` zero bytes, streamed, so a test can pack a huge member without holding it."""

    def __init__(self, size: int):
        self.left = size

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_a_huge_packaged_figure_is_refused_unread(tmp_path):
    size = 80 * 2**20  # over the 64 MiB default
    path = tmp_path / "in" / "PMC5.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("PMC5/img-g1.png")
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros(size)))
        add(tar, "PMC5/a.nxml", article(5))
    out, images = tmp_path / "figs.jsonl", tmp_path / "images"
    tracemalloc.start()
    try:
        extract.run(_args(out, [path.parent], images_out=images))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    (row,) = _rows(out)
    assert row["image"] is None and _all_files(images) == []
    (skip,) = _skipped(out)
    assert skip["reason"] == "bad image file"
    assert skip["detail"].startswith(f"{path}:PMC5/img-g1.png: ") and "over the 64 MiB limit" in skip["detail"]


@pytest.mark.parametrize("packaged", [False, True])
def test_figures_over_max_image_mb_or_not_images_are_not_copied(tmp_path, packaged):
    good_jpeg, good_png = _jpeg(), _png()
    corrupt_png = bytearray(good_png)
    corrupt_png[40] ^= 0xFF  # inside a chunk: its CRC no longer holds
    images = {"img-a.jpg": good_jpeg, "img-b.png": good_png, "img-c.png": b"png",
              "img-d.jpg": b"<html>not an image</html>", "img-e.png": bytes(corrupt_png),
              "img-f.png": good_png[:20], "img-g.jpg": _jpeg(size=1024, noise=True)}
    names = tuple(n[4] for n in sorted(images))
    data = article(3, figures=names)
    folder = tmp_path / "in"
    if packaged:
        package(folder / "PMC3.tar.gz", [(f"PMC3/{n}", d) for n, d in images.items()] + [("PMC3/a.nxml", data)])
    else:
        (folder / "PMC3").mkdir(parents=True)
        (folder / "PMC3" / "a.nxml").write_bytes(data)
        for n, d in images.items():
            (folder / "PMC3" / n).write_bytes(d)
    assert len(images["img-g.jpg"]) > 2**20
    out, images_out = tmp_path / "figs.jsonl", tmp_path / "images"
    extract.run(_args(out, [folder], images_out=images_out, max_image_mb=1))
    by_fig = {r["figure_id"]: r["image"] for r in _rows(out)}
    assert by_fig == {"a": "PMC3/img-a.jpg", "b": "PMC3/img-b.png", "c": None, "d": None, "e": None, "f": None,
                      "g": None}
    assert _all_files(images_out) == ["PMC3/img-a.jpg", "PMC3/img-b.png"]
    assert (images_out / "PMC3" / "img-a.jpg").read_bytes() == good_jpeg
    skips = _skipped(out)
    assert {s["reason"] for s in skips} == {"bad image file"}
    assert sorted(s["detail"].split(": ")[0].rsplit("/", 1)[-1] for s in skips) == [
        "img-c.png", "img-d.jpg", "img-e.png", "img-f.png", "img-g.jpg"]
    assert any("over the 1 MiB limit" in s["detail"] for s in skips)


def _stored_package(path: Path, image: bytes) -> bytes:
    """An uncompressed-deflate .tar.gz (stored blocks), so the image's bytes sit verbatim in the file."""
    package(path, [("PMC4/img-g1.jpg", image), ("PMC4/a.nxml", article(4))], compresslevel=0)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["flip-in-image", "flip-crc", "truncate-trailer", "flip-deflate"])
def test_a_corrupt_compressed_stream_skips_the_package_not_the_run(tmp_path, damage):
    image = _jpeg(size=128, noise=True)
    path = tmp_path / "in" / "PMC4.tar.gz"
    raw = bytearray(_stored_package(path, image))
    if damage == "flip-in-image":  # JPEG entropy data: only the gzip CRC can tell
        at = raw.index(image[2000:2032]) + 16
        raw[at] ^= 0x01
    elif damage == "flip-crc":
        raw[-6] ^= 0x01
    elif damage == "truncate-trailer":
        del raw[-5:]
    else:
        package(path, [("PMC4/img-g1.jpg", image), ("PMC4/a.nxml", article(4))])
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    package(tmp_path / "in" / "PMC6.tar.gz", [("PMC6/img-g1.jpg", _jpeg()), ("PMC6/a.nxml", article(6))])
    out, images = tmp_path / "figs.jsonl", tmp_path / "images"
    extract.run(_args(out, [tmp_path / "in"], images_out=images))
    assert [r["pmcid"] for r in _rows(out)] == ["PMC6"]
    assert _all_files(images) == ["PMC6/img-g1.jpg"]
    (skip,) = _skipped(out)
    assert skip["reason"] == "unreadable package or file" and skip["detail"].startswith(f"{path}: ")
    assert "corrupt compressed stream" in skip["detail"]


# -- 3. thousands of articles in one package -------------------------------------------------------

def test_a_package_of_many_articles_is_indexed_once_and_read_in_order(tmp_path, monkeypatch):
    n = 1500
    members = []
    for i in range(n):
        members += [(f"a{i % 3}/img-{i}.png", _png()), (f"a{i % 3}/PMC{1000 + i}.nxml", article(1000 + i, (str(i),)))]
    path = package(tmp_path / "in" / "big.tar.gz", members)
    built, reads = [], []
    real_index, real_check = article_inputs.ImageIndex.__init__, extract.check_image
    monkeypatch.setattr(article_inputs.ImageIndex, "__init__",
                        lambda self, *a, **k: (built.append(1), real_index(self, *a, **k))[1])
    monkeypatch.setattr(extract, "check_image", lambda data: (reads.append(data), real_check(data))[1])
    offsets, real_extract = [], tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: (offsets.append(m.offset_data), real_extract(self, m))[1])
    out, images = tmp_path / "figs.jsonl", tmp_path / "images"
    extract.run(_args(out, [path], images_out=images))
    rows = _rows(out)
    assert len(rows) == n and all(r["image"] == f"{r['pmcid']}/img-{int(r['pmcid'][3:]) - 1000}.png" for r in rows)
    assert len(built) == 3  # one index per folder, not one per article
    assert len(reads) == n and len(_all_files(images)) == n
    # Articles are read in archive order, then images: a gzip stream is never rewound for a member.
    assert offsets[:n] == sorted(offsets[:n]) and offsets[n:] == sorted(offsets[n:]) and len(offsets) == 2 * n


def test_a_flat_folder_of_many_loose_articles_is_listed_once(tmp_path, monkeypatch):
    n = 1500
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(n):
        (folder / f"PMC{1000 + i}.nxml").write_bytes(article(1000 + i, (str(i),)))
        (folder / f"img-{i}.png").write_bytes(b"")
    built = []
    real_index = article_inputs.ImageIndex.__init__
    monkeypatch.setattr(article_inputs.ImageIndex, "__init__",
                        lambda self, *a, **k: (built.append(1), real_index(self, *a, **k))[1])
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, [folder]))
    rows = _rows(out)
    assert len(rows) == n and rows[-1]["image"] == f"img-{n - 1}.png"
    assert len(built) == 1


# -- 4. links and paths that leave the input ------------------------------------------------------

def _loose_article(folder: Path, pmcid: int, figures=("g1",)) -> Path:
    art = folder / f"PMC{pmcid}"
    art.mkdir(parents=True)
    (art / "a.nxml").write_bytes(article(pmcid, figures))
    return art


@pytest.mark.parametrize("link", ["outside", "sibling", "dangling"])
@pytest.mark.parametrize("copy", [False, True])
def test_a_symlinked_figure_in_a_loose_folder_is_not_followed(tmp_path, link, copy):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg("green"))
    art = _loose_article(tmp_path / "in", 1, ("g1", "g2"))
    (art / "img-g2.jpg").write_bytes(_jpeg())
    target = {"outside": secret, "sibling": art / "img-g2.jpg", "dangling": tmp_path / "missing.jpg"}[link]
    os.symlink(target, art / "img-g1.jpg")
    out, images = tmp_path / "figs.jsonl", tmp_path / "images"
    extract.run(_args(out, [tmp_path / "in"], images_out=images if copy else None))
    by_fig = {r["figure_id"]: r["image"] for r in _rows(out)}
    assert by_fig["g1"] is None and by_fig["g2"] == "PMC1/img-g2.jpg"
    if copy:
        assert _all_files(images) == ["PMC1/img-g2.jpg"]
    (skip,) = _skipped(out)
    assert skip["reason"] == "image file refused"
    assert skip["detail"] == f"{art}{os.sep}img-g1.jpg: a symbolic link, not followed"


def test_a_symlinked_article_in_a_folder_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere.nxml"
    elsewhere.write_bytes(article(77))
    _loose_article(tmp_path / "in", 1)
    os.symlink(elsewhere, tmp_path / "in" / "PMC77.nxml")
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, [tmp_path / "in"]))
    assert [r["pmcid"] for r in _rows(out)] == ["PMC1"]
    (skip,) = _skipped(out)
    assert skip == {"reason": "symbolic link not followed", "detail": str(tmp_path / "in" / "PMC77.nxml")}


def test_package_hard_links_resolve_and_other_links_are_refused_with_a_reason(tmp_path):
    jpeg = _jpeg("purple")
    path = package(tmp_path / "in" / "PMC2.tar.gz", [
        ("PMC2/img-a.jpg", jpeg),
        ("PMC2/img-b.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "PMC2/img-a.jpg"}),
        ("PMC2/img-c.jpg", b"", {"type": tarfile.LNKTYPE, "linkname": "PMC2/missing.jpg"}),
        ("PMC2/img-d.jpg", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/hostname"}),
        ("PMC2/img-e.jpg", b"", {"type": tarfile.FIFOTYPE}),
        ("PMC2/a.nxml", article(2, ("a", "b", "c", "d", "e")))])
    for copy in (False, True):
        out, images = tmp_path / f"figs{copy}.jsonl", tmp_path / "images"
        extract.run(_args(out, [path], images_out=images if copy else None))
        by_fig = {r["figure_id"]: r["image"] for r in _rows(out)}
        prefix = "PMC2/"
        assert by_fig == {"a": prefix + "img-a.jpg", "b": prefix + "img-b.jpg", "c": None, "d": None, "e": None}
        skips = sorted((s["reason"], s["detail"]) for s in _skipped(out))
        assert skips == [
            ("image file refused", f"{path}:PMC2/img-c.jpg: a hard link to 'PMC2/missing.jpg', which is no file in the package"),
            ("image file refused", f"{path}:PMC2/img-d.jpg: a symbolic link, not followed"),
            ("image file refused", f"{path}:PMC2/img-e.jpg: not a regular file")]
    assert (images / "PMC2" / "img-b.jpg").read_bytes() == jpeg


@pytest.mark.parametrize("folder", ["../../up", "/abs/dir", "PMC3/../../up"])
def test_package_member_paths_that_leave_the_package_are_skipped(tmp_path, folder):
    path = package(tmp_path / "in" / "PMC3.tar.gz", [
        (f"{folder}/img-g1.jpg", _jpeg()), (f"{folder}/a.nxml", article(3)),
        ("PMC9/img-g1.jpg", _jpeg()), ("PMC9/a.nxml", article(9))])
    out = tmp_path / "figs.jsonl"
    extract.run(_args(out, [path]))
    assert [(r["pmcid"], r["image"]) for r in _rows(out)] == [("PMC9", "PMC9/img-g1.jpg")]
    skips = _skipped(out)
    assert [s["reason"] for s in skips] == ["unsafe path in package"] * 2
    assert skips[0]["detail"] == f"{path}:{folder}/img-g1.jpg: absolute or climbs out with '..'"


def test_fifos_in_a_folder_are_refused_without_blocking(tmp_path):
    art = _loose_article(tmp_path / "in", 1, ("g1",))
    os.mkfifo(art / "img-g1.jpg")  # a figure that would block a reader forever
    os.mkfifo(tmp_path / "in" / "PMC2.nxml")  # so would this article
    out, images = tmp_path / "figs.jsonl", tmp_path / "images"
    worker = threading.Thread(target=extract.run, args=(_args(out, [tmp_path / "in"], images_out=images),), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "extract blocked opening a FIFO"
    assert [(r["pmcid"], r["image"]) for r in _rows(out)] == [("PMC1", None)]
    assert sorted((s["reason"], s["detail"]) for s in _skipped(out)) == [
        ("image file refused", f"{art}{os.sep}img-g1.jpg: not a regular file"),
        ("not a regular file", str(tmp_path / "in" / "PMC2.nxml"))]


def test_max_image_mb_on_the_command_line(tmp_path):
    from medllava.cli import main

    folder = _loose_article(tmp_path / "in", 1, ("g1",))
    (folder / "img-g1.jpg").write_bytes(_jpeg(size=1024, noise=True))  # over 1 MiB
    out, images = tmp_path / "figs.jsonl", tmp_path / "images"
    assert main(["curate", "extract", "--jats", str(tmp_path / "in"), "--images-out", str(images),
                 "--out", str(out), "--max-image-mb", "1"]) == 0
    assert _rows(out)[0]["image"] is None and _all_files(images) == []
    assert main(["curate", "extract", "--jats", str(tmp_path / "in"), "--images-out", str(images),
                 "--out", str(out)]) == 0
    assert _rows(out)[0]["image"] == "PMC1/img-g1.jpg" and _all_files(images) == ["PMC1/img-g1.jpg"]
