"""`medllava curate classify`: add modality labels, confidences and a compound flag to figure records.

Text rules do the work (curation/modality.py, rule table in curation/modality_rules.yaml). An
optional image classifier, named as `module:function`, is called with each figure's image path
and returns `{label: score}`; its scores are blended with the text scores. Lines are classified
in chunks, in worker processes with `--workers N`, and written in input order.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from medllava.io import DataError, atomic_open

from medllava.curation.common import StepReport, clear_stale_temps, load_callable
from medllava.curation.modality import LABELS, ModalityClassifier, decide, finish_scores, load_rules
from medllava.curation.sources import is_llava_med_record, llava_med_to_figure

CHUNK_LINES = 2000


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs to classify a chunk; hashable so workers cache what it builds."""

    rules: tuple[str, ...] = ()
    min_confidence: float = 0.5
    keep: tuple[str, ...] = ()
    image_classifier: str | None = None
    image_root: str | None = None
    image_weight: float = 0.5


@functools.lru_cache(maxsize=4)
def build_classifier(rules: tuple[str, ...], min_confidence: float) -> ModalityClassifier:
    return ModalityClassifier(load_rules(list(rules)), min_confidence)


def blend(text: dict[str, float], image: dict[str, float], weight: float) -> dict[str, float]:
    """(1 - weight) * text + weight * image per label; a label a side does not name scores 0 there."""
    return {label: (1 - weight) * text.get(label, 0.0) + weight * float(image.get(label, 0.0))
            for label in LABELS if label in text or label in image}


def _image_scores(record: dict, settings: Settings, counts: Counter, examples: dict) -> dict | None:
    if not record.get("image"):
        return None
    path = os.path.join(settings.image_root or "", record["image"])
    try:
        scores = load_callable(settings.image_classifier, "--image-classifier")(path)
        if not isinstance(scores, dict):
            raise TypeError(f"returned {type(scores).__name__}, expected a dict of label scores")
        unknown = set(scores) - set(LABELS)
        if unknown:
            raise ValueError(f"returned unknown labels {sorted(unknown)}")
        return {label: float(v) for label, v in scores.items()}
    except Exception as e:  # noqa: BLE001 - a user plug-in can fail any way; the text scores stand
        counts["image classifier failed (text scores kept)"] += 1
        examples.setdefault("image classifier failed (text scores kept)", []).append(f"{record['id']}: {e}")
        return None


def classify_record(record: dict, settings: Settings, counts: Counter, examples: dict) -> dict:
    """The record with `modalities`, `modality_scores` and `compound` set."""
    clf = build_classifier(settings.rules, settings.min_confidence)
    result = clf.classify(record.get("caption") or "", record.get("mentions") or ())
    scores, labels = result.scores, result.modalities
    if settings.image_classifier:
        image = _image_scores(record, settings, counts, examples)
        if image is not None:
            text = {k: v for k, v in scores.items() if k != "other" or labels != ["other"]}
            mixed = blend(text, image, settings.image_weight)
            labels = decide(mixed, settings.min_confidence)
            scores = finish_scores(mixed, labels)
    record["modalities"] = labels
    record["modality_scores"] = scores
    record["compound"] = result.compound and len(labels) > 1
    return record


def classify_chunk(chunk: tuple[str, list[tuple[int, str]]], settings: Settings):
    """Classify `(line number, raw JSONL line)` pairs.

    Returns the output lines, the label counts of the records written, and the skip/note counts
    with a few examples per reason.
    """
    path, lines = chunk
    out: list[str] = []
    labels: Counter = Counter()
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}

    def skip(reason: str, where: str | None) -> None:
        counts[reason] += 1
        shown = examples.setdefault(reason, [])
        if where is not None and len(shown) < 5:
            shown.append(where)

    for lineno, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            if is_llava_med_record(record):
                record = llava_med_to_figure(record)
        except (ValueError, DataError, TypeError) as e:
            skip("not a valid figure record", f"{path}:{lineno}: {e}")
            continue
        if not record.get("id"):
            skip("record without an id", f"{path}:{lineno}")
            continue
        record = classify_record(record, settings, counts, examples)
        if settings.keep and not set(record["modalities"]) & set(settings.keep):
            skip(DROPPED, None)  # a filter, not an error: no examples
            continue
        labels.update(record["modalities"])
        out.append(json.dumps(record, ensure_ascii=False))
    return out, labels, counts, examples


DROPPED = "no kept modality (--keep)"
NOTES = ("image classifier failed (text scores kept)",)


def _chunks(path: Path, size: int) -> Iterator[tuple[str, list[tuple[int, str]]]]:
    with open(path, encoding="utf-8") as f:
        lines: list[tuple[int, str]] = []
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                lines.append((lineno, line))
            if len(lines) >= size:
                yield str(path), lines
                lines = []
        if lines:
            yield str(path), lines


def _labels(value: str) -> tuple[str, ...]:
    labels = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in labels if v not in LABELS]
    if unknown:
        raise ValueError(f"--keep: unknown labels {unknown}; choose from {', '.join(LABELS)}")
    return labels


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "classify", help="label figure records by imaging modality (caption rules, optional image model)",
        description="Multi-label modality classification of figure records from caption and mention text "
                    f"({', '.join(LABELS)}), with a confidence per label and a compound-figure flag.")
    p.add_argument("--in", dest="inp", type=Path, required=True, metavar="FILE",
                   help="figure records or LLaVA-Med per-figure records (JSONL)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="classified figure records (JSONL)")
    p.add_argument("--keep", type=_labels, default=(), metavar="LABELS",
                   help="comma-separated labels; write only records with at least one of them")
    p.add_argument("--min-confidence", type=float, default=0.5, metavar="X",
                   help="a label is assigned when its confidence is at least X (default 0.5)")
    p.add_argument("--rules", action="append", default=[], metavar="FILE",
                   help="YAML rules extending the shipped table (curation/modality_rules.yaml); repeatable")
    p.add_argument("--image-classifier", metavar="MODULE:FUNCTION",
                   help="callable given an image path, returning {label: score}; blended with the text scores")
    p.add_argument("--image-root", type=Path, metavar="DIR", help="folder the records' image paths are relative to")
    p.add_argument("--image-weight", type=float, default=0.5, metavar="W",
                   help="share of the image scores in the blend (default 0.5)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.inp.is_file():
        raise FileNotFoundError(f"--in file not found: {args.inp}")
    if not 0.0 < args.min_confidence <= 1.0 or not 0.0 <= args.image_weight <= 1.0:
        raise ValueError("--min-confidence must be in (0, 1] and --image-weight in [0, 1]")
    if args.image_classifier and args.image_root is None:
        raise ValueError("--image-classifier needs --image-root (the folder image paths are relative to)")
    settings = Settings(rules=tuple(str(r) for r in args.rules), min_confidence=args.min_confidence,
                        keep=args.keep, image_classifier=args.image_classifier,
                        image_root=str(args.image_root) if args.image_root else None,
                        image_weight=args.image_weight)
    # Build once here so a broken rules file or plug-in fails before any work starts.
    build_classifier(settings.rules, settings.min_confidence)
    if settings.image_classifier:
        load_callable(settings.image_classifier, "--image-classifier")
    clear_stale_temps([args.out])
    report = StepReport("classify")
    labels: Counter = Counter()
    with atomic_open(args.out, "w") as out:
        for lines, chunk_labels, counts, examples in _map(settings, _chunks(args.inp, CHUNK_LINES), args.workers):
            for line in lines:
                out.write(line)
                out.write("\n")
            labels.update(chunk_labels)
            report.written += len(lines)
            for reason, n in counts.items():
                if reason in NOTES:
                    report.note(reason, n)
                else:
                    report.skipped[reason] += n
                for ex in examples.get(reason, []):
                    shown = report.examples.setdefault(reason, [])
                    if len(shown) < 5:
                        shown.append(ex)
            report.read += len(lines) + sum(n for r, n in counts.items() if r not in NOTES)
    for label in LABELS:
        if labels[label]:
            report.note(f"written with label {label}", labels[label])
    print(report.summary())
    return 0


def _map(settings: Settings, chunks, workers: int):
    """Classified chunks in input order, in this process or a pool of `workers`."""
    work = functools.partial(classify_chunk, settings=settings)
    if workers <= 1:
        yield from map(work, chunks)
        return
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(work, chunks)
