"""`medllava curate extract`: PMC OA articles and released caption files to figure records (JSONL).

JATS articles come loose (`.nxml` with their image files in the same folder) or as OA packages
(`.tar.gz`, one article per package). A figure's graphic href has no extension, so the image is
found by file stem, preferring JPEG/PNG over TIFF/GIF/EPS. Without `--images-out` a record's
`image` is the path inside the package (or below the folder given), i.e. relative to where the
packages are unpacked; with it the image is copied to `DIR/<pmcid>/` and `image` is relative to DIR.

An article that cannot be read is skipped, counted, named in the summary and listed in
`<out>.skipped.jsonl`; the run goes on. Hostile input is refused the same way: an article over
32 MiB (or a million elements), an image over `--max-image-mb` or that Pillow cannot read (it is
checked before it is written), a package whose compressed stream fails its checksum, a symbolic
link (never followed), a package member whose path is absolute or climbs out with '..'. Hard links
inside a package resolve to the member they name.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
import xml.etree.ElementTree as ET
from xml.parsers import expat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from medllava.io import atomic_open, write_jsonl

from medllava.curation.common import (READ_CHUNK, Rejected, StepReport, TooLarge, check_image, clear_stale_temps,
                             read_capped)
from medllava.curation.jats import Article, ArticleTooLargeError, UnsafeXMLError, parse_article
from medllava.curation.sources import PMCID, llava_med_records, pmc15m_records

# Lower rank wins: JPEG/PNG are what training reads; TIFF/EPS are print masters.
IMAGE_RANK = {".jpg": 0, ".jpeg": 0, ".png": 1, ".webp": 2, ".bmp": 3, ".tif": 4, ".tiff": 4,
              ".gif": 5, ".eps": 6}
PACKAGE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# Files found in a folder that are never opened, with the skip reason.
REFUSED_KINDS = {"link": "symbolic link not followed", "special": "not a regular file"}


# Caps far above any real PMC article or figure: a hostile file costs at most this much memory.
MAX_ARTICLE_BYTES = 32 * 2**20
DEFAULT_MAX_IMAGE_MB = 64
# Magic bytes of the compressions tarfile reads, and the module that checks each one's checksums.
_DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


class PackageError(ValueError):
    """An OA package that holds no article, or whose compressed stream is corrupt."""


class ImageIndex:
    """The image files of one folder by stem (exact and case-folded), built once per folder.

    `files` maps a file name (no folder) to the opaque key its reader takes; `refused` maps a name
    that is never read (a symbolic link, a hard link to nothing in the package) to the reason.
    """

    def __init__(self, files: dict[str, object], refused: dict[str, str] | None = None):
        self.files = files
        self.refused = refused or {}
        self._exact: dict[str, list[str]] = {}
        self._folded: dict[str, list[str]] = {}
        for name in [*self.files, *self.refused]:
            stem, ext = posixpath.splitext(name)
            if ext.lower() in IMAGE_RANK:
                self._exact.setdefault(stem, []).append(name)
                self._folded.setdefault(stem.lower(), []).append(name)

    def resolve(self, href: str | None) -> str | None:
        """The file a graphic href points at: same stem, best-ranked image extension, readable first."""
        if not href:
            return None
        base = posixpath.basename(href.replace("\\", "/"))
        stem, ext = posixpath.splitext(base)
        if ext.lower() not in IMAGE_RANK:
            # Hrefs carry no extension, but a stem can contain dots ("pone.0046493.g001").
            stem = base
        matches = self._exact.get(stem) or self._folded.get(stem.lower())
        if not matches:
            return None
        return min(matches, key=lambda n: (n in self.refused, IMAGE_RANK[posixpath.splitext(n)[1].lower()], n))


@dataclass
class ArticleInput:
    """One article to extract: where it is named in reports, its XML, and its image files.

    `image_prefix` is the path of the image files relative to the image root; `origin` names their
    folder in reports; `read_image(key, cap)` reads at most `cap` bytes of one; `order(key)` is its
    position in the file, the order images are copied in.
    """

    name: str
    read_xml: Callable[[], bytes]
    images: ImageIndex
    image_prefix: str
    origin: str
    read_image: Callable[[object, int], bytes]
    order: Callable[[object], int]


@dataclass
class CopyJob:
    """One image to copy to --images-out, and the records (figures) that show it."""

    source: ArticleInput
    name: str
    records: list[dict]

    @property
    def key(self) -> object:
        return self.source.images.files[self.name]


def discover(paths: list[str]) -> Iterator[tuple[str, Path, Path]]:
    """(kind, file, root) for every article file under `paths`; kind is "nxml" or "package", or
    "link" / "special" for a symbolic link / non-regular file found in a folder, which is never opened
    (a file named on the command line is: the user chose it).
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    kind = _kind(name)
                    if kind:
                        file = Path(folder) / name
                        yield _refusal(file) or kind, file, path
        elif path.is_file():
            yield _kind(path.name) or "nxml", path, path.parent
        else:
            raise FileNotFoundError(f"--jats input not found: {path}")


def _refusal(file: Path) -> str | None:
    """"link" for a symbolic link, "special" for a FIFO, device or socket (opening one can block), else None."""
    mode = file.lstat().st_mode
    return "link" if stat.S_ISLNK(mode) else None if stat.S_ISREG(mode) else "special"


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith((".nxml", ".xml")):
        return "nxml"
    if lower.endswith(PACKAGE_SUFFIXES):
        return "package"
    return None


def _read_file(path: Path, cap: int, follow: bool) -> bytes:
    """At most `cap` bytes of a regular file; with follow=False a symbolic link is refused (O_NOFOLLOW)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (fstat then refuses it).
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(os.open(path, flags), "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not a regular file")
        return read_capped(f, cap, st.st_size)


@functools.lru_cache(maxsize=8)
def _folder_index(folder: Path) -> ImageIndex:
    """A folder's files by lstat, symbolic links refused; cached as a flat folder may hold thousands of articles."""
    files: dict[str, object] = {}
    refused: dict[str, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                refused[entry.name] = "a symbolic link, not followed"
            elif entry.is_file(follow_symlinks=False):
                files[entry.name] = entry.name
            elif not entry.is_dir(follow_symlinks=False):
                refused[entry.name] = "not a regular file"
    return ImageIndex(files, refused)


def _loose_inputs(path: Path, root: Path, jobs: dict[Path, CopyJob], cap: int,
                  report: StepReport) -> Iterator[ArticleInput]:
    folder = path.parent
    prefix = folder.relative_to(root).as_posix() if folder != root else ""
    yield ArticleInput(name=str(path), read_xml=lambda: _read_file(path, MAX_ARTICLE_BYTES, follow=True),
                       images=_folder_index(folder), image_prefix=prefix, origin=f"{folder}{os.sep}",
                       read_image=lambda name, n: _read_file(folder / name, n, follow=False),
                       order=lambda _name: 0)
    _copy_images(jobs, cap, report)


def _check_stream(path: Path) -> None:
    """Read a compressed package through once so its checksums are verified before any member is used.

    tarfile stops at the archive's end marker and never reaches the gzip trailer, so a corrupt
    stream would otherwise give corrupt images silently.
    """
    with open(path, "rb") as f:
        head = f.read(6)
    opener = next((o for magic, o in _DECOMPRESSORS if head.startswith(magic)), None)
    if opener is None:
        return
    try:
        with opener(path, "rb") as stream:
            while stream.read(READ_CHUNK):
                pass
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise PackageError(f"corrupt compressed stream ({type(e).__name__}: {e})") from None


def _safe_member(name: str) -> bool:
    """A member path that stays inside the package: relative, no '..' step."""
    return not name.startswith("/") and ".." not in name.split("/")


def _package_index(members: list[tarfile.TarInfo], path: Path,
                   report: StepReport) -> tuple[list[tarfile.TarInfo], dict[str, ImageIndex]]:
    """The package's articles and one image index per folder, built in one pass over its members.

    A hard link resolves to the regular member it names (tar stores a repeated file so); a symbolic
    link, or a hard link to nothing in the package, is refused with the reason. A member whose path
    is absolute or climbs with '..' is skipped: its path would point outside the package.
    """
    regular = {m.name: m for m in members if m.isfile()}
    xmls: list[tarfile.TarInfo] = []
    folders: dict[str, tuple[dict, dict]] = {}
    for m in members:
        if m.isdir():
            continue
        if not _safe_member(m.name):
            report.skip("unsafe path in package", f"{path}:{m.name}: absolute or climbs out with '..'")
            continue
        folder, base = posixpath.split(m.name)
        files, refused = folders.setdefault(folder, ({}, {}))
        if m.isfile() and base.lower().endswith((".nxml", ".xml")):
            xmls.append(m)
        elif m.isfile():
            files[base] = m
        elif m.islnk() and m.linkname in regular:
            files[base] = regular[m.linkname]
        elif m.islnk():
            refused[base] = f"a hard link to {m.linkname!r}, which is no file in the package"
        else:
            refused[base] = "a symbolic link, not followed" if m.issym() else "not a regular file"
    if not xmls:
        raise PackageError("no .nxml article in the package")
    return xmls, {folder: ImageIndex(files, refused) for folder, (files, refused) in folders.items()}


def _package_inputs(path: Path, jobs: dict[Path, CopyJob], cap: int, report: StepReport) -> Iterator[ArticleInput]:
    """Articles in one OA package; members are read through tarfile, never extracted by name."""
    _check_stream(path)
    with tarfile.open(path, "r:*") as tar:
        xmls, indexes = _package_index(tar.getmembers(), path, report)

        def read(member: tarfile.TarInfo, n: int) -> bytes:
            f = tar.extractfile(member)
            if f is None:
                raise Rejected("not a regular file")
            return read_capped(f, n, member.size)

        for xml in xmls:
            folder = posixpath.dirname(xml.name)
            yield ArticleInput(name=f"{path}:{xml.name}", read_xml=functools.partial(read, xml, MAX_ARTICLE_BYTES),
                               images=indexes[folder], image_prefix=folder,
                               origin=f"{path}:{folder}/" if folder else f"{path}:",
                               read_image=read, order=lambda member: member.offset_data)
        # Once every article is read, in archive order: reading a member behind the last one read
        # rewinds a gzip stream and inflates it again from the start.
        _copy_images(jobs, cap, report)


def _copy_images(jobs: dict[Path, CopyJob], cap: int, report: StepReport) -> None:
    """Copy each image to its target (atomically) if it is under `cap` and decodable; else skip it
    with the reason and clear the `image` of the records that show it."""
    for target, job in sorted(jobs.items(), key=lambda item: item[1].source.order(item[1].key)):
        where = f"{job.source.origin}{job.name}"
        try:
            data = job.source.read_image(job.key, cap)
            check_image(data)
            with atomic_open(target, "wb") as f:
                f.write(data)
        except Exception as e:  # noqa: BLE001 - a bad member costs its figure's image, nothing more
            report.skip("bad image file", f"{where}: {e or type(e).__name__}")
            for record in job.records:
                record["image"] = None
    jobs.clear()


def article_records(article: Article, source: ArticleInput, pmcid: str, images_out: Path | None,
                    report: StepReport, jobs: dict[Path, CopyJob]) -> list[dict]:
    """Figure records of one parsed article, resolving each image; with `images_out` the copies
    are queued in `jobs` (the caller copies them, see _copy_images)."""
    records = []
    queued: dict[Path, CopyJob] = {}
    for fig in article.figures:
        image = None
        found = source.images.resolve(fig.href)
        if found is None:
            report.note("figures without an image file")
        elif found in source.images.refused:
            report.skip("image file refused", f"{source.origin}{found}: {source.images.refused[found]}")
        elif images_out is not None:
            image = f"{pmcid}/{found}"
        else:
            image = posixpath.join(source.image_prefix, found) if source.image_prefix else found
        records.append({
            "id": f"{pmcid}_{fig.figure_id}", "pmcid": pmcid, "pmid": article.pmid,
            "figure_id": fig.figure_id, "label": fig.label, "caption": fig.caption, "image": image,
            "licence": article.licence, "mentions": fig.mentions, "source": "jats",
        })
        target = images_out / pmcid / found if image is not None and images_out is not None else None
        if target is not None and not target.exists():
            queued.setdefault(target, CopyJob(source, found, [])).records.append(records[-1])
    for target, job in queued.items():  # queued only now: an article that fails midway copies nothing
        jobs.setdefault(target, CopyJob(job.source, job.name, [])).records.extend(job.records)
    return records


def file_articles(item: tuple[str, Path, Path], images_out: Path | None,
                  max_image_bytes: int = DEFAULT_MAX_IMAGE_MB * 2**20) -> tuple[list, StepReport]:
    """Parse one discovered file (a loose article or a package): its [(pmcid, records, name)] and report.

    Runs in worker processes with --workers, hence the separate report that the caller merges.
    Whatever goes wrong in one article or file is a skip with its reason, never the end of the run.
    """
    kind, path, root = item
    report = StepReport("extract", log_skips=True)
    found: list = []
    if kind in REFUSED_KINDS:
        report.read += 1
        report.skip(REFUSED_KINDS[kind], str(path))
        return found, report
    jobs: dict[Path, CopyJob] = {}
    sources = (_package_inputs(path, jobs, max_image_bytes, report) if kind == "package"
               else _loose_inputs(path, root, jobs, max_image_bytes, report))
    opened = 0
    try:
        # The package stays open while its articles become records; their images are copied
        # (with --images-out) once the last article is read, before the generator closes it.
        for source in sources:
            opened += 1
            report.read += 1
            try:
                article = _article(source, images_out, report, jobs)
            except Exception as e:  # noqa: BLE001 - one broken article must not end a long run
                report.skip("unexpected error in the article", f"{source.name}: {type(e).__name__}: {e}")
                continue
            if article is not None:
                found.append(article)
    except Exception as e:  # noqa: BLE001 - tarfile, zlib, OS and our own errors alike
        report.read += 0 if opened else 1
        report.skip("unreadable package or file", f"{path}: {e or type(e).__name__}")
        for job in jobs.values():  # the package broke before its images were copied
            for record in job.records:
                record["image"] = None
    return found, report


def jats_records(paths: list[str], images_out: Path | None, report: StepReport, pool=None,
                 max_image_bytes: int = DEFAULT_MAX_IMAGE_MB * 2**20) -> Iterator[dict]:
    """Figure records from every article under `paths`, in discovery order; bad articles are skipped."""
    _folder_index.cache_clear()  # files may have changed since an earlier run in this process
    work = functools.partial(file_articles, images_out=images_out, max_image_bytes=max_image_bytes)
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


def _article(source: ArticleInput, images_out: Path | None, report: StepReport,
             jobs: dict[Path, CopyJob]) -> tuple[str, list[dict], str] | None:
    try:
        article = parse_article(source.read_xml())
    except (TooLarge, ArticleTooLargeError) as e:
        report.skip("article too large", f"{source.name}: {e}")
        return None
    except Rejected as e:
        report.skip("article file refused", f"{source.name}: {e}")
        return None
    except UnsafeXMLError as e:
        report.skip("unsafe XML", f"{source.name}: {e}")
        return None
    except (ET.ParseError, expat.ExpatError, ValueError) as e:  # expat's own, from the prolog check
        report.skip("malformed XML", f"{source.name}: {e}")
        return None
    found = PMCID.search(article.pmcid or "") or PMCID.search(source.name)
    if not found:
        report.skip("no PMC id in the article or its file name", source.name)
        return None
    pmcid = found.group(0)
    return pmcid, article_records(article, source, pmcid, images_out, report, jobs), source.name


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
    p.add_argument("--max-image-mb", type=int, default=DEFAULT_MAX_IMAGE_MB, metavar="N",
                   help=f"skip (and list) an image file over N MiB instead of copying it (default {DEFAULT_MAX_IMAGE_MB})")
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
            yield from jats_records(args.jats, args.images_out, report, pool,
                                    getattr(args, "max_image_mb", DEFAULT_MAX_IMAGE_MB) * 2**20)
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
