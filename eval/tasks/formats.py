"""Readers for the file formats benchmark releases come in: JSON / JSONL, CSV, parquet,
pickles (through a restricted unpickler) and the LLaVA conversation format.

Every reader yields `(location, record)` where the location names the file and the line,
row or record, so a loader's error can point at the exact place. A record that cannot be
read but leaves the rest of the file readable (a broken JSONL line, a CSV row with extra
fields) comes through as an error record, so a loader can stop on it or skip it and go on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medllava.io import DataError, iter_json_array, read_jsonl

from medllava.eval.tasks.safe_pickle import load_plain_pickle

_CONVERSATION_KEYS = ("conversations", "conversatons")  # LLaVA-Med files misspell it
ERROR_KEY = "_error"


def error_record(message: str) -> dict:
    """A stand-in for a record that could not be read; loaders raise (or skip) it in order."""
    return {ERROR_KEY: message}


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array (streamed) or a JSONL file; unparsable JSONL lines come as error records."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            for i, obj in iter_json_array(path):
                yield f"{path}: record {i}", obj
            return
        errors: list[str] = []
        for lineno, obj in read_jsonl(path, skip_bad=True, errors=errors):
            yield from (("", error_record(e)) for e in errors)
            errors.clear()
            yield f"{path}:{lineno}", obj
        yield from (("", error_record(e)) for e in errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def json_object(path: Path) -> Any:
    """A whole small JSON file (an object keyed by image, a vocabulary...)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def csv_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of a CSV file with a header line, keyed by column name."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV file (no header line)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                yield where, error_record(f"{where}: {len(reader.fieldnames) + len(row[None])} fields but the "
                                          f"header has {len(reader.fieldnames)}")
                continue
            yield where, {k: (v if v != "" else None) for k, v in row.items()}


def parquet_records(path: Path, batch_size: int = 256) -> Iterator[tuple[str, dict]]:
    """Rows of a parquet file (the Hugging Face releases), read in batches."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    index = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield f"{path}: row {index}", row
            index += 1


def pickle_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Elements of a pickled list, loaded without running any code from the file."""
    obj = load_plain_pickle(path)
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a pickled list of records, got {type(obj).__name__}")
    for i, item in enumerate(obj):
        yield f"{path}: record {i}", item


def records(path: Path) -> Iterator[tuple[str, Any]]:
    """Records of any supported file, chosen by extension."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return parquet_records(path)
    if suffix in (".pkl", ".pickle"):
        return pickle_records(path)
    if suffix == ".csv":
        return csv_records(path)
    return json_records(path)


def is_conversation_file(path: Path) -> bool:
    """True when `path` holds LLaVA conversation-format records ({id, image, conversations})."""
    if path.suffix.lower() not in (".json", ".jsonl"):
        return False
    for _, first in json_records(path):
        return isinstance(first, dict) and any(k in first for k in _CONVERSATION_KEYS)
    return False


def conversation_qa(raw: dict, where: str) -> tuple[str, Any]:
    """(question, answer) from the first human turn and the gpt turn after it."""
    turns = next((raw[k] for k in _CONVERSATION_KEYS if k in raw), None)
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataError(f"{where}: expected a 'conversations' list with a question and an answer turn")
    human, gpt = turns[0], turns[1]
    if not (isinstance(human, dict) and isinstance(gpt, dict)):
        raise DataError(f"{where}: conversation turns must be objects with 'from' and 'value'")
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        raise DataError(f"{where}: expected turns from 'human' then 'gpt', got "
                        f"{human.get('from')!r} then {gpt.get('from')!r}")
    question = str(human.get("value", "")).replace("<image>", "").strip()
    if not question:
        raise DataError(f"{where}: empty question in the human turn")
    return question, gpt.get("value")


def find_parquet(root: Path, split: str) -> Path | None:
    """The Hugging Face layout: `data/<split>-00000-of-00001-<hash>.parquet` (or `<split>.parquet`)."""
    hits = sorted(root.glob(f"**/{split}-*.parquet")) + sorted(root.glob(f"**/{split}.parquet"))
    if len(hits) > 1:
        raise DataError(f"{root}: {len(hits)} parquet files for split {split!r} ({hits[0].name}, {hits[1].name}, ...); "
                        "pass the one to read as file=")
    return hits[0] if hits else None


def parquet_image(raw: dict, where: str) -> tuple[str | None, bytes]:
    """(stored file name, encoded bytes) from a Hugging Face `Image` column value."""
    image = raw.get("image")
    if isinstance(image, dict) and isinstance(image.get("bytes"), (bytes, bytearray)):
        return image.get("path"), bytes(image["bytes"])
    raise DataError(f"{where}: expected an image column with encoded bytes, got {type(image).__name__}")
