"""`medllava curate extract`: PMC OA articles and released caption files to figure records (JSONL).

JATS articles come loose (`.nxml` with their image files in the same folder) or as OA packages
(`.tar.gz`, one article per package). A figure's graphic href has no extension, so the image is
found by file stem, preferring JPEG/PNG over TIFF/GIF/EPS. Without `--images-out` a record's
`image` is the path inside the package (or below the folder given), i.e. relative to where the
packages are unpacked; with it the image is copied to `DIR/<pmcid>/` and `image` is relative to DIR.

An article that cannot be read is skipped, counted, named in the summary and listed in
`<out>.skipped.jsonl`; the run goes on.
"""

from __future__ import annotations

import functools
import os
import posixpath
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from medllava.io import atomic_open, write_jsonl

from curation.common import StepReport, clear_stale_temps
from curation.jats import Article, UnsafeXMLError, parse_article
from curation.sources import PMCID, llava_med_records, pmc15m_records

# Lower rank wins: JPEG/PNG are what training reads; TIFF/EPS are print masters.
IMAGE_RANK = {".jpg": 0, ".jpeg": 0, ".png": 1, ".webp": 2, ".bmp": 3, ".tif": 4, ".tiff": 4,
              ".gif": 5, ".eps": 6}
PACKAGE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class PackageError(ValueError):
    """An OA package that holds no article."""


@dataclass
class ArticleInput:
    """One article to extract: where it is named in reports, its XML, and its image files.

    `images` maps a file name (no folder) to an opaque key that `read_image` turns into bytes;
    `image_prefix` is the path of those files relative to the image root.
    """

    name: str
    xml: bytes
    images: dict[str, str]
    image_prefix: str
    read_image: Callable[[str], bytes]


def discover(paths: list[str]) -> Iterator[tuple[str, Path, Path]]:
    """(kind, file, root) for every article file under `paths`; kind is "nxml" or "package"."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    kind = _kind(name)
                    if kind:
                        yield kind, Path(folder) / name, path
        elif path.is_file():
            yield _kind(path.name) or "nxml", path, path.parent
        else:
            raise FileNotFoundError(f"--jats input not found: {path}")


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith((".nxml", ".xml")):
        return "nxml"
    if lower.endswith(PACKAGE_SUFFIXES):
        return "package"
    return None


def resolve_image(href: str | None, names: list[str]) -> str | None:
    """The file in `names` a graphic href points at: same stem, best-ranked image extension."""
    if not href:
        return None
    base = posixpath.basename(href.replace("\\", "/"))
    stem, ext = posixpath.splitext(base)
    if ext.lower() not in IMAGE_RANK:
        # Hrefs carry no extension, but a stem can contain dots ("pone.0046493.g001").
        stem = base
    for fold in (False, True):
        want = stem.lower() if fold else stem
        matches = [n for n in names if (posixpath.splitext(n)[0].lower() if fold else posixpath.splitext(n)[0]) == want
                   and posixpath.splitext(n)[1].lower() in IMAGE_RANK]
        if matches:
            return min(matches, key=lambda n: (IMAGE_RANK[posixpath.splitext(n)[1].lower()], n))
    return None


@functools.lru_cache(maxsize=8)
def _listing(folder: Path) -> tuple[str, ...]:
    """File names in a folder; cached because a flat folder may hold thousands of articles."""
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))


def _loose_inputs(path: Path, root: Path) -> Iterator[ArticleInput]:
    folder = path.parent
    prefix = folder.relative_to(root).as_posix() if folder != root else ""
    yield ArticleInput(name=str(path), xml=path.read_bytes(), images={n: n for n in _listing(folder)},
                       image_prefix=prefix, read_image=lambda n: (folder / n).read_bytes())


def _package_inputs(path: Path) -> Iterator[ArticleInput]:
    """Articles in one OA package; members are read through tarfile, never extracted by name."""
    with tarfile.open(path, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        by_name = {m.name: m for m in members}
        xmls = [m for m in members if m.name.lower().endswith((".nxml", ".xml"))]
        if not xmls:
            raise PackageError("no .nxml article in the package")

        def read(name: str) -> bytes:
            f = tar.extractfile(by_name[name])
            return f.read() if f else b""

        for xml_member in xmls:
            folder = posixpath.dirname(xml_member.name)
            images = {posixpath.basename(m.name): m.name for m in members
                      if posixpath.dirname(m.name) == folder}
            yield ArticleInput(name=f"{path}:{xml_member.name}", xml=read(xml_member.name), images=images,
                               image_prefix=folder, read_image=read)


def article_records(article: Article, source: ArticleInput, pmcid: str, images_out: Path | None,
                    report: StepReport) -> list[dict]:
    """Figure records of one parsed article, resolving (and optionally copying) each image."""
    names = list(source.images)
    records = []
    for fig in article.figures:
        image = None
        found = resolve_image(fig.href, names)
        if found is None:
            report.note("figures without an image file")
        elif images_out is not None:
            target = images_out / pmcid / found
            if not target.exists():
                with atomic_open(target, "wb") as f:
                    f.write(source.read_image(source.images[found]))
            image = f"{pmcid}/{found}"
        else:
            image = posixpath.join(source.image_prefix, found) if source.image_prefix else found
        records.append({
            "id": f"{pmcid}_{fig.figure_id}", "pmcid": pmcid, "pmid": article.pmid,
            "figure_id": fig.figure_id, "label": fig.label, "caption": fig.caption, "image": image,
            "licence": article.licence, "mentions": fig.mentions, "source": "jats",
        })
    return records


def file_articles(item: tuple[str, Path, Path], images_out: Path | None) -> tuple[list, StepReport]:
    """Parse one discovered file (a loose article or a package): its [(pmcid, records, name)] and report.

    Runs in worker processes with --workers, hence the separate report that the caller merges.
    """
    kind, path, root = item
    report = StepReport("extract", log_skips=True)
    found = []
    sources = _package_inputs(path) if kind == "package" else _loose_inputs(path, root)
    opened = 0
    try:
        # The package stays open while its articles become records: images are read lazily.
        for source in sources:
            opened += 1
            report.read += 1
            article = _article(source, images_out, report)
            if article is not None:
                found.append(article)
    except (tarfile.TarError, OSError, EOFError, PackageError) as e:
        report.read += 0 if opened else 1
        report.skip("unreadable package or file", f"{path}: {e}")
    return found, report


def jats_records(paths: list[str], images_out: Path | None, report: StepReport, pool=None) -> Iterator[dict]:
    """Figure records from every article under `paths`, in discovery order; bad articles are skipped."""
    _listing.cache_clear()  # files may have changed since an earlier run in this process
    work = functools.partial(file_articles, images_out=images_out)
    results = map(work, discover(paths)) if pool is None else pool.imap(work, discover(paths), chunksize=8)
    seen: set[str] = set()
    for found, part in results:
        report.merge(part)
        for pmcid, records, name in found:
            if pmcid in seen:
                report.skip("article already extracted", f"{name}: {pmcid}")
                continue
            seen.add(pmcid)
            if not records:
                report.note("articles without figures")
            yield from records


def _article(source: ArticleInput, images_out: Path | None, report: StepReport) -> tuple[str, list[dict], str] | None:
    try:
        article = parse_article(source.xml)
    except UnsafeXMLError as e:
        report.skip("unsafe XML", f"{source.name}: {e}")
        return None
    except (ET.ParseError, ValueError) as e:
        report.skip("malformed XML", f"{source.name}: {e}")
        return None
    found = PMCID.search(article.pmcid or "") or PMCID.search(source.name)
    if not found:
        report.skip("no PMC id in the article or its file name", source.name)
        return None
    pmcid = found.group(0)
    return pmcid, article_records(article, source, pmcid, images_out, report), source.name


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="PMC OA articles / caption files to figure records (JSONL)",
        description="Extract figure records (caption, image, mentions, licence) from PMC Open Access "
                    "JATS articles (.nxml or OA .tar.gz packages), PMC-15M-style JSONL and LLaVA-Med "
                    "figure records.")
    p.add_argument("--jats", nargs="+", default=[], metavar="PATH",
                   help="article files (.nxml, .tar.gz) or folders searched recursively")
    p.add_argument("--pmc15m", action="append", default=[], metavar="FILE",
                   help="PMC-15M-style JSONL: image + caption (+ pmcid, pmid, figure_id, id)")
    p.add_argument("--llava-med", action="append", default=[], metavar="FILE",
                   help="LLaVA-Med figure records (JSON array, JSONL, or grouped by domain)")
    p.add_argument("--images-out", type=Path, metavar="DIR",
                   help="copy each figure's image to DIR/<pmcid>/ and make `image` relative to DIR")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="figure records (JSONL)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes parsing articles (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not (args.jats or args.pmc15m or args.llava_med):
        raise ValueError("nothing to extract: give --jats, --pmc15m or --llava-med")
    # Images a killed run was copying count too: this step alone fills --images-out.
    clear_stale_temps([args.out], [args.images_out] if args.images_out is not None else [])
    report = StepReport("extract", unit="articles/rows", log_skips=True)

    def records() -> Iterator[dict]:
        if args.jats:
            yield from jats_records(args.jats, args.images_out, report, pool)
        for path in args.pmc15m:
            yield from pmc15m_records(path, report)
        for path in args.llava_med:
            yield from llava_med_records(path, report)

    workers = getattr(args, "workers", 1)
    pool = get_context("spawn").Pool(workers) if workers > 1 and args.jats else None
    try:
        report.written = write_jsonl(args.out, records())
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    skipped_path = Path(f"{args.out}.skipped.jsonl")
    if report.skip_log:
        write_jsonl(skipped_path, report.skip_log)
    elif skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run would mislead
    print(report.summary())
    if report.skip_log:
        print(f"  every skipped article/row is listed in {skipped_path}")
    return 0
