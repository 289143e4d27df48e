"""`medllava curate extract`: PMC OA articles and released caption files to figure records (JSONL).

Articles are found and read by `medllava.curation.article_inputs` (loose `.nxml` or OA `.tar.gz`
packages, links and unsafe member paths refused). Without `--images-out` a record's `image` is the
path inside the package (or below the folder given), i.e. relative to where the packages are
unpacked; with it the image is copied to `DIR/<pmcid>/` and `image` is relative to DIR.

An article that cannot be read is skipped, counted, named in the summary and listed in
`<out>.skipped.jsonl`; the run goes on. Hostile input is refused the same way: an article over
32 MiB (or a million elements), an image over `--max-image-mb` or that Pillow cannot read (it is
checked before it is written), a package whose compressed stream fails its checksum, a symbolic
link (never followed), a package member whose path is absolute or climbs out with '..'. Hard links
inside a package resolve to the member they name.
"""

from __future__ import annotations

import functools
import posixpath
import xml.etree.ElementTree as ET
from xml.parsers import expat
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from medllava.io import atomic_open, write_jsonl

from medllava.curation.article_inputs import (REFUSED_KINDS, ArticleInput, clear_folder_indexes, discover,
                                              loose_inputs, package_inputs)
from medllava.curation.common import Rejected, StepReport, TooLarge, check_image, clear_stale_temps
from medllava.curation.jats import Article, ArticleTooLargeError, UnsafeXMLError, parse_article
from medllava.curation.sources import PMCID, llava_med_records, pmc15m_records

# Caps far above any real PMC article or figure: a hostile file costs at most this much memory.
MAX_ARTICLE_BYTES = 32 * 2**20
DEFAULT_MAX_IMAGE_MB = 64


@dataclass
class CopyJob:
    """One image to copy to --images-out, and the records (figures) that show it."""

    source: ArticleInput
    name: str
    records: list[dict]

    @property
    def key(self) -> object:
        return self.source.images.files[self.name]


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
    copy_images = functools.partial(_copy_images, jobs, max_image_bytes, report)
    sources = (package_inputs(path, report, copy_images) if kind == "package"
               else loose_inputs(path, root, copy_images))
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
    clear_folder_indexes()
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
        article = parse_article(source.read_xml(MAX_ARTICLE_BYTES))
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
