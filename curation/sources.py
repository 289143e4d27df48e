"""Figure records from released figure-caption files: PMC-15M-style JSONL and LLaVA-Med records.

PMC-15M-style rows carry an image path and a caption, sometimes ids. LLaVA-Med's per-figure
records (`pmid, pair_id, fig_id, fig_label, fig_caption, graphic_ref, in_text_mention, domain`)
come as a JSON array, JSONL, or (its evaluation sample) an object of lists keyed by domain.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path

from medllava.io import DataError, iter_json_or_jsonl, read_jsonl

PMCID = re.compile(r"PMC\d+")
# LLaVA-Med mentions are whitespace-tokenised ("( Fig. 3 ) ."); these undo the common cases.
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}%]|'s\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[{]) ")


def squash(text: str) -> str:
    return " ".join(text.split())


def detokenize(tokens: str) -> str:
    """Readable text from a whitespace-tokenised sentence."""
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", squash(tokens)))


def is_llava_med_record(obj: dict) -> bool:
    return "fig_caption" in obj and "caption" not in obj


def llava_med_to_figure(obj: dict) -> dict:
    """One LLaVA-Med per-figure record as a figure record."""
    graphic = obj.get("graphic_ref") or None
    pmcid = PMCID.search(graphic or "")
    pmid = obj.get("pmid")
    fig_id = obj.get("fig_id") or None
    rid = obj.get("pair_id") or (f"{pmid}_{fig_id}" if pmid and fig_id else None)
    if not rid:
        raise DataError("no pair_id (nor pmid and fig_id) to identify the figure")
    mentions = []
    for m in obj.get("in_text_mention") or []:
        text = detokenize(m.get("tokens", "") if isinstance(m, dict) else str(m))
        if text and text not in mentions:
            mentions.append(text)
    return {
        "id": str(rid),
        "pmcid": pmcid.group(0) if pmcid else None,
        "pmid": str(pmid) if pmid else None,
        "figure_id": fig_id,
        "label": (obj.get("fig_label") or "").strip().rstrip(".") or None,
        "caption": squash(obj.get("fig_caption") or ""),
        "image": graphic,
        "licence": None,
        "mentions": mentions,
        "source": "llava_med",
    }


def iter_llava_med(path: str | os.PathLike, errors: list | None = None) -> Iterator[tuple[str, dict]]:
    """(location, raw record) from a LLaVA-Med figure-record file in any of its three layouts.

    Broken JSONL lines are skipped and their messages appended to `errors`.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        try:
            json.loads(first)
            one_per_line = True
        except ValueError:
            one_per_line = False
        if not one_per_line:
            # An object of lists keyed by domain; only the small evaluation sample is shaped so.
            with open(path, encoding="utf-8") as f:
                grouped = json.load(f)
            if not isinstance(grouped, dict):
                raise DataError(f"{path}: expected LLaVA-Med records, got a JSON {type(grouped).__name__}")
            for key, rows in grouped.items():
                for i, row in enumerate(rows if isinstance(rows, list) else [rows]):
                    yield f"{key}[{i}]", row
            return
    yield from iter_json_or_jsonl(path, skip_bad=True, errors=errors)


def llava_med_records(path: str | os.PathLike, report) -> Iterator[dict]:
    """Figure records from a LLaVA-Med file; bad records are skipped and counted in `report`."""
    errors: list[str] = []
    for where, obj in iter_llava_med(path, errors):
        _count_broken_lines(errors, report)
        report.read += 1
        try:
            if not isinstance(obj, dict):
                raise DataError(f"expected an object, got {type(obj).__name__}")
            yield llava_med_to_figure(obj)
        except DataError as e:
            report.skip("bad LLaVA-Med record", f"{path}: {where}: {e}")
    _count_broken_lines(errors, report)


def _count_broken_lines(errors: list[str], report) -> None:
    """Count (as read and skipped) the unparseable lines the reader noted since the last call."""
    for msg in errors:
        report.read += 1
        report.skip("not a JSON object", msg)
    errors.clear()


def pmc15m_to_figure(obj: dict) -> dict:
    """One PMC-15M-style row (`image`, `caption`, optional `pmcid`/`pmid`/`figure_id`/`id`)."""
    image = obj.get("image") or obj.get("image_path") or obj.get("file_name")
    caption = obj.get("caption")
    if not isinstance(image, str) or not image.strip():
        raise DataError("no image path")
    if not isinstance(caption, str):
        raise DataError("no caption")
    stem = posixpath.splitext(posixpath.basename(image.replace("\\", "/")))[0]
    found = PMCID.search(str(obj.get("pmcid") or "")) or PMCID.search(image)
    pmcid = found.group(0) if found else None
    figure_id = str(obj.get("figure_id") or stem)
    rid = obj.get("id") or (f"{pmcid}_{figure_id}" if pmcid and pmcid not in figure_id else figure_id)
    return {
        "id": str(rid),
        "pmcid": pmcid,
        "pmid": str(obj["pmid"]) if obj.get("pmid") else None,
        "figure_id": str(figure_id),
        "label": obj.get("label"),
        "caption": squash(caption),
        "image": image,
        "licence": obj.get("licence") or obj.get("license"),
        "mentions": list(obj.get("mentions") or []),
        "source": "pmc15m",
    }


def pmc15m_records(path: str | os.PathLike, report) -> Iterator[dict]:
    """Figure records from a PMC-15M-style JSONL file; bad lines are skipped and counted."""
    errors: list[str] = []
    for lineno, obj in read_jsonl(path, skip_bad=True, errors=errors):
        _count_broken_lines(errors, report)
        report.read += 1
        try:
            yield pmc15m_to_figure(obj)
        except DataError as e:
            report.skip("bad PMC-15M row", f"{path}:{lineno}: {e}")
    _count_broken_lines(errors, report)
