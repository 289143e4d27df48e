"""`medllava curate dedupe`: drop duplicate figures and figures leaked from benchmark test sets.

Each record's image is fingerprinted (sha256 of the file, 64-bit pHash of the pixels). First the
leakage check: a figure whose image equals or nearly equals (pHash within `--max-distance`) an
image in any `--benchmark-images` folder is dropped, so VQA-RAD / SLAKE / PathVQA test images
cannot reach training through PMC. Then duplicates: the first record with an image is kept and
later exact or near copies are dropped. Every dropped record is listed with its reason and the
matching record or benchmark file in `<out>.removed.jsonl`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path

from medllava.io import write_jsonl
from medllava.records import check_image_path

from medllava.curation.common import StepReport, clear_stale_temps, iter_figure_records

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm"}
DEFAULT_MAX_DISTANCE = 6
BATCH = 256


def fingerprint(path: str) -> tuple[str, int] | str:
    """(sha256, pHash) of an image file, or the reason it could not be read."""
    # Imported here: numpy, scipy and Pillow stay out of `medllava --help`.
    from medllava.images import ImageLoadError, load_image

    from medllava.curation.phash import phash, sha256_file

    try:
        return sha256_file(path), phash(load_image(path))
    except (ImageLoadError, OSError, ValueError) as e:
        return str(e) or type(e).__name__


def _fingerprints(paths: list[str], workers: int, pool) -> list[tuple[str, int] | str]:
    if pool is None:
        return [fingerprint(p) for p in paths]
    return pool.map(fingerprint, paths, chunksize=max(1, len(paths) // (workers * 4)))


class Fingerprints:
    """sha256 and pHash lookups over a set of images, keyed by a label for the report."""

    def __init__(self, max_distance: int):
        from medllava.curation.phash import HashIndex

        self.exact: dict[str, str] = {}
        self.near = HashIndex(max_distance)

    def match(self, sha: str, value: int) -> tuple[str, int] | None:
        """(key, distance) of a stored image equal (distance 0) or near to this one."""
        if sha in self.exact:
            return self.exact[sha], 0
        return self.near.nearest(value)

    def add(self, sha: str, value: int, key: str) -> None:
        self.exact.setdefault(sha, key)
        self.near.add(value, key)


def benchmark_fingerprints(folders: list[Path], max_distance: int, workers: int, pool,
                           report: StepReport) -> Fingerprints:
    """Fingerprints of every image file under the benchmark folders."""
    files = []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"--benchmark-images folder not found: {folder}")
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    bench = Fingerprints(max_distance)
    for i in range(0, len(files), BATCH):
        batch = files[i:i + BATCH]
        for path, fp in zip(batch, _fingerprints(batch, workers, pool)):
            if isinstance(fp, str):
                report.note("benchmark images unreadable (not checked)")
                continue
            bench.add(fp[0], fp[1], path)
    report.note("benchmark images fingerprinted", len(bench.near))
    return bench


def dedupe(records, image_root: Path, bench: Fingerprints, max_distance: int, workers: int, pool,
           report: StepReport, removed: list[dict]) -> Iterator[dict]:
    """Records kept after the leakage check and de-duplication, in input order."""
    kept = Fingerprints(max_distance)
    batch: list[dict] = []

    def flush() -> Iterator[dict]:
        found, todo = {}, {}
        for r in batch:
            if r.get("image"):
                try:
                    todo[id(r)] = os.path.join(image_root, check_image_path(r["image"]))
                except ValueError as e:
                    found[id(r)] = str(e)
        found.update(zip(todo, _fingerprints(list(todo.values()), workers, pool)))
        for record in batch:
            if not record.get("image"):
                report.note("records without an image (passed through)")
                yield record
                continue
            fp = found[id(record)]
            if isinstance(fp, str):
                report.skip("image missing or unreadable", f"{record['id']}: {fp}")
                continue
            sha, value = fp
            leak = bench.match(sha, value)
            if leak is not None:
                _remove(report, removed, record, "matches a benchmark image", *leak)
                continue
            dup = kept.match(sha, value)
            if dup is not None:
                _remove(report, removed, record, "exact duplicate" if sha in kept.exact else "near duplicate", *dup)
                continue
            kept.add(sha, value, record["id"])
            yield record
        batch.clear()

    for record in records:
        batch.append(record)
        if len(batch) >= BATCH:
            yield from flush()
    yield from flush()


def _remove(report: StepReport, removed: list[dict], record: dict, reason: str, match: str, dist: int) -> None:
    report.skip(reason)
    removed.append({"id": record["id"], "image": record["image"], "reason": reason, "match": match,
                    "distance": dist})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dedupe", help="drop duplicate images and images leaked from benchmark test sets",
        description="Drop figure records whose image matches a benchmark test image (leakage), then exact "
                    "(sha256) and near (perceptual hash) duplicates, keeping the first.")
    p.add_argument("--in", dest="inp", type=Path, required=True, metavar="FILE", help="figure records (JSONL)")
    p.add_argument("--image-root", type=Path, required=True, metavar="DIR",
                   help="folder the records' image paths are relative to")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="kept figure records (JSONL)")
    p.add_argument("--benchmark-images", type=Path, nargs="+", default=[], metavar="DIR",
                   help="folders of benchmark images (e.g. VQA-RAD, SLAKE, PathVQA test images)")
    p.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE, metavar="N",
                   help=f"pHash Hamming distance counted as the same picture (default {DEFAULT_MAX_DISTANCE})")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes decoding images (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.image_root.is_dir():
        raise FileNotFoundError(f"--image-root folder not found: {args.image_root}")
    clear_stale_temps([args.out])
    report = StepReport("dedupe")
    removed: list[dict] = []
    pool = get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        bench = benchmark_fingerprints(args.benchmark_images, args.max_distance, args.workers, pool, report)
        records = iter_figure_records(args.inp, report)
        kept = dedupe(records, args.image_root, bench, args.max_distance, args.workers, pool, report, removed)
        report.written = write_jsonl(args.out, kept)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    removed_path = Path(f"{args.out}.removed.jsonl")
    write_jsonl(removed_path, removed)
    print(report.summary())
    print(f"  removed records listed in {removed_path}")
    return 0
