"""Curation throughput on one core: captions classified per second and JATS articles extracted per
second, with the projection for a PMC-15M-sized job (15M captions, 4.4M articles) on 2 cores.

    python benchmarks/bench_curation.py [--captions 20000] [--articles 300]

Captions are the real captions and mentions of tests/assets/curation/modality_labelled.jsonl
repeated as figure records (JSONL in, JSONL out: parsing and writing are counted). The baseline
is the obvious classifier: one IGNORECASE regex per cue, looped over in Python. Articles are the
two shipped PMC articles (one with 4 figures, one without), packed as OA .tar.gz packages with
small images, so reading the package, parsing, finding mentions and resolving images all count.
Rates are per CPU second of this process (`time.process_time`), so other work on the machine
does not distort the per-core figure.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medllava.curation.classify import Settings, classify_chunk  # noqa: E402
from medllava.curation.common import StepReport  # noqa: E402
from medllava.curation.extract import jats_records  # noqa: E402
from medllava.curation.modality import load_rules  # noqa: E402

ASSETS = REPO / "tests" / "assets" / "curation"
JOB_CAPTIONS, JOB_ARTICLES, CORES = 15_000_000, 4_400_000, 2


def caption_lines(n: int) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in (ASSETS / "modality_labelled.jsonl").read_text().splitlines()]
    lines = []
    for i in range(n):
        row = rows[i % len(rows)]
        record = {"id": f"{row['id']}#{i}", "pmcid": None, "pmid": None, "figure_id": None, "label": None,
                  "caption": row["caption"], "image": f"img/{i}.jpg", "licence": None,
                  "mentions": row["mentions"], "source": "jats"}
        lines.append((i + 1, json.dumps(record, ensure_ascii=False)))
    return lines


def time_classify(lines: list[tuple[int, str]]) -> float:
    settings = Settings()
    classify_chunk(("warm-up", lines[:100]), settings)  # builds and caches the classifier
    start = time.process_time()
    for i in range(0, len(lines), 2000):
        classify_chunk(("bench", lines[i:i + 2000]), settings)
    return len(lines) / (time.process_time() - start)


def time_naive(lines: list[tuple[int, str]]) -> float:
    """Baseline: each cue its own IGNORECASE regex, looped over per caption."""
    rules = load_rules()
    cues = [(c.label, c.weight, re.compile(rf"(?<!\w)(?:{c.pattern})(?!\w)", 0 if c.case else re.I))
            for c in rules.cues]
    start = time.process_time()
    for _, line in lines:
        record = json.loads(line)
        miss: dict[str, float] = {}
        for label, weight, rx in cues:
            if rx.search(record["caption"]):
                miss[label] = miss.get(label, 1.0) * (1 - weight)
        record["modality_scores"] = {k: 1 - v for k, v in miss.items()}
        json.dumps(record, ensure_ascii=False)
    return len(lines) / (time.process_time() - start)


def build_packages(folder: Path, n: int) -> None:
    """n OA packages alternating the two shipped articles, each under its own PMC id."""
    articles = [(ASSETS / "pone.0046493.nxml").read_bytes(), (ASSETS / "1472-6831-8-11.nxml").read_bytes()]
    image = b"\xff\xd8" + bytes(20_000)  # image bytes are only listed and resolved, never decoded
    for i in range(n):
        xml = articles[i % 2]
        # A distinct PMC id per copy, so none is skipped as already extracted.
        xml = re.sub(rb'(<article-id pub-id-type="pmc">)\d+', rb"\g<1>" + str(9_000_000 + i).encode(), xml)
        with tarfile.open(folder / f"PMC{9_000_000 + i}.tar.gz", "w:gz") as tar:
            members = [(f"pone.0046493.g00{k}.jpg", image) for k in range(1, 5)] + [("article.nxml", xml)]
            for name, data in members:
                info = tarfile.TarInfo(f"PMC{9_000_000 + i}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def time_extract(n: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        build_packages(Path(tmp), n)
        report = StepReport("bench")
        start = time.process_time()
        figures = sum(1 for _ in jats_records([tmp], None, report))
        return n / (time.process_time() - start), figures


def projection(rate: float, total: int) -> str:
    seconds = total / (rate * CORES)
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--articles", type=int, default=300)
    args = parser.parse_args()
    lines = caption_lines(args.captions)
    fast = time_classify(lines)
    naive = time_naive(lines)
    articles, figures = time_extract(args.articles)
    print(f"{'task (one core)':<44}{'per second':>12}{'PMC-15M job on 2 cores':>26}")
    print(f"{'classify captions (combined regex)':<44}{fast:>12,.0f}{projection(fast, JOB_CAPTIONS):>26}")
    print(f"{'classify captions (loop of per-cue regexes)':<44}{naive:>12,.0f}{projection(naive, JOB_CAPTIONS):>26}")
    print(f"{'extract JATS articles from OA .tar.gz':<44}{articles:>12,.1f}{projection(articles, JOB_ARTICLES):>26}")
    print(f"({args.captions} captions of {sum(len(line) for _, line in lines) // len(lines)} JSON chars on average; "
          f"{args.articles} packages gave {figures} figures; 2-core projection assumes --workers 2 scales linearly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
