"""Fuzzing `curate extract`: a few hundred corrupted JATS articles and OA .tar.gz packages (truncations, bit
flips, random bytes, a member declaring a huge size) in one run beside intact ones. The run ends normally
inside a fixed address-space budget, every intact article is extracted, and every input that is not is
accounted for: extracted, or listed in the skip list with a one-line reason naming its file."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

from fuzzing import BUDGET_BYTES, mutate

from medllava.commands.demo import _pack_article

REPO = Path(__file__).resolve().parents[1]
ARTICLES = sorted((REPO / "medllava" / "assets" / "demo" / "pmc").glob("*.nxml"))
CASES_PER_SEED = 60

CHILD = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({budget}, {budget}))
    from medllava.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def huge_member_package(article: Path, target: Path) -> None:
    """A package whose figure member's header declares 2**40 bytes, with a few bytes behind it."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = article.read_bytes()
        info = tarfile.TarInfo(f"{article.stem}/{article.name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    huge = tarfile.TarInfo(f"{article.stem}/huge.jpg")
    huge.size = 1 << 40
    members = buf.getvalue().rstrip(b"\0")  # the end-of-archive blocks dropped
    members += b"\0" * (-len(members) % 512)
    target.write_bytes(gzip.compress(members + huge.tobuf(tarfile.GNU_FORMAT) + b"\xff\xd8" * 256))


def write_cases(folder: Path) -> tuple[list[Path], list[Path]]:
    """(fuzzed inputs, intact packages); the intact ones sort first, so their PMC ids are theirs."""
    rng = random.Random(61206)
    seeds, intact = {}, []
    for article in ARTICLES:
        package = folder / f"0_intact_{article.stem}.tar.gz"
        intact.append(package)
        _pack_article(article, package)
        seeds[article.name] = article.read_bytes()
        seeds[package.name.removeprefix("0_intact_")] = package.read_bytes()
    files = []
    for name, data in seeds.items():
        for i in range(CASES_PER_SEED):
            path = folder / f"fuzz{i:03d}_{name}"
            path.write_bytes(mutate(data, rng))
            files.append(path)
    huge_member_package(ARTICLES[0], folder / "huge_member.tar.gz")
    return [*files, folder / "huge_member.tar.gz"], intact


def test_corrupted_articles_and_packages_never_end_the_run(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    fuzzed, intact = write_cases(inputs)
    assert len(fuzzed) >= 200
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(budget=BUDGET_BYTES), "curate", "extract", "--jats", str(inputs),
         "--images-out", str(tmp_path / "images"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    skipped = [json.loads(line) for line in out.with_name(out.name + ".skipped.jsonl").read_text().splitlines()]
    assert all(row["reason"] and "\n" not in (row["detail"] or "") for row in skipped)
    # The intact packages are extracted whole, images included, whatever else the run met.
    with_figures = {article.pmcid for article in map(parse, ARTICLES) if article.figures}
    assert {r["pmcid"] for r in records} == with_figures
    images = [r["image"] for r in records if r["image"]]
    assert images and all((tmp_path / "images" / i).is_file() for i in images)
    # Every fuzzed input is named in the skip list, but for those damaged where extraction does not look:
    # each of those still parsed as one of the two articles, which the intact packages had extracted.
    named = {Path(row["detail"].split(":")[0]).name for row in skipped if row["detail"]}
    survivors = [p for p in fuzzed if p.name not in named]
    assert "huge_member.tar.gz" in named
    assert len(survivors) < len(fuzzed) // 4
    assert not [r for r in skipped if r["reason"] == "unexpected error in the article"]
    read = int(proc.stdout.split(" articles/rows read")[0].rsplit(" ", 1)[-1])
    assert read >= len(skipped) - sum(r["reason"] in ("bad image file", "image file refused") for r in skipped)


def parse(article: Path):
    from medllava.curation.jats import parse_article

    return parse_article(article.read_bytes())
