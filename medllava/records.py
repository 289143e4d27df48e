"""The one record format: LLaVA conversation records, read, validated and normalised.

A record is `{"id": str, "image": str | list[str] | None, "conversations": [{"from": "human"|"gpt",
"value": str}, ...]}` with one `<image>` placeholder per image, in human turns. This is the format of
LLaVA, LLaVA-Med and ALLaVA; LLaVA-Med's released instruction files spell the key `conversatons`,
which is accepted. Records come from a JSON array or JSONL file, streamed one at a time.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medllava.io import DataError, iter_json_or_jsonl

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
# Role spellings seen in released files, mapped to the two canonical roles.
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}
CONVERSATION_KEYS = ("conversations", "conversatons")


class RecordError(DataError):
    """A record that breaks the schema; the message names the file and the record."""


@dataclass
class ReadReport:
    """What a lenient read kept and skipped, for the end-of-run summary."""

    read: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self, limit: int = 5) -> str:
        lines = [f"{self.read} records read, {self.kept} kept, {len(self.skipped)} skipped"]
        lines += [f"  {msg}" for msg in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


def image_paths(record: dict) -> list[str]:
    """The record's image paths as a list (empty for a text-only record)."""
    image = record.get("image")
    if image is None or image == "":
        return []
    return [image] if isinstance(image, str) else list(image)


def check_image_path(path: str) -> str:
    """Return `path` normalised if it is relative and stays inside the image root; else raise ValueError.

    The check is lexical (the file need not exist yet): absolute paths, drive letters and any path
    whose normalised form starts with `..` are refused.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"image path must be a non-empty string, got {path!r}")
    unixy = path.replace("\\", "/")
    if unixy.startswith("/") or (len(unixy) > 1 and unixy[1] == ":"):
        raise ValueError(f"image path {path!r} is absolute; it must be relative to the image root")
    norm = posixpath.normpath(unixy)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"image path {path!r} escapes the image root")
    return norm


def symlink_escape(path: Path, root: Path) -> str | None:
    """Why `path` leaves `root` once symlinks are resolved, or None when it stays inside.

    The lexical check (`check_image_path`) cannot see links: `scans/a.png` may be a symlink to
    /home/someone/other.png, or `scans` a symlink to /. `root` itself may be a symlink (a dataset
    mounted elsewhere); what counts is where each link below it leads. The reason names the first
    link on the way that leads out.
    """
    # absolute() keeps "..": collapsing "link/.." by hand would skip the link the OS follows.
    root, path = Path(root).absolute(), Path(path).absolute()
    real_root = root.resolve()
    if path.resolve().is_relative_to(real_root):
        return None
    if not path.is_relative_to(root):
        return f"not under the image root {root}"
    current = root
    for step in path.relative_to(root).parts:
        current = current / step
        if current.is_symlink() and not current.resolve().is_relative_to(real_root):
            return f"{current} is a symlink to {current.resolve()}, outside the image root {root}"
    return f"resolves to {path.resolve()}, outside the image root {root}"


def resolve_image_path(root: str | os.PathLike, path: str, where: str = "record") -> Path:
    """`root / path` for an image path read from a record, after both checks: lexical
    (`check_image_path`) and symlinks (`symlink_escape`). Raises RecordError whose one line names
    `where` (e.g. "data.json: record 'r12'") and the file."""
    try:
        full = Path(root) / check_image_path(path)
    except ValueError as e:
        raise RecordError(f"{where}: {e}") from None
    reason = symlink_escape(full, Path(root))
    if reason:
        raise RecordError(f"{where}: image {path!r} refused: {reason}")
    return full


def normalize_record(raw: Any, where: str = "") -> dict:
    """Validate one raw record and return it in canonical form.

    Canonical form: `id` as str, `image` as str / list / None, `conversations` with roles `human`/`gpt`.
    Raises RecordError naming `where` (e.g. "data.json: record 12") and the record id.
    """
    rid = raw.get("id") if isinstance(raw, dict) else None
    prefix = f"{where}: record {rid!r}" if rid is not None else (where or "record")

    def fail(msg: str) -> RecordError:
        return RecordError(f"{prefix}: {msg}")

    if not isinstance(raw, dict):
        raise fail(f"expected an object, got {type(raw).__name__}")
    if rid is None or str(rid) == "":
        raise fail("missing 'id'")
    turns = next((raw[k] for k in CONVERSATION_KEYS if k in raw), None)
    if not isinstance(turns, list) or not turns:
        raise fail("missing or empty 'conversations'")
    conversations = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise fail(f"turn {i} must be an object with 'from' and 'value'")
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise fail(f"turn {i} has unknown role {turn['from']!r} (expected human or gpt)")
        expected = HUMAN if i % 2 == 0 else GPT
        if role != expected:
            raise fail(f"turn {i} is from {role} but roles must alternate starting with human")
        if not isinstance(turn["value"], str):
            raise fail(f"turn {i} value must be a string")
        if role == GPT and IMAGE_PLACEHOLDER in turn["value"]:
            raise fail(f"turn {i}: {IMAGE_PLACEHOLDER} appears in an assistant turn")
        conversations.append({"from": role, "value": turn["value"]})
    if conversations[-1]["from"] != GPT:
        raise fail("the last turn must be from gpt (an unanswered question trains nothing)")

    images = image_paths(raw)
    try:
        images = [check_image_path(p) for p in images]
    except ValueError as e:
        raise fail(str(e)) from None
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations)
    if n_placeholders != len(images):
        raise fail(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    image = None if not images else images[0] if isinstance(raw.get("image"), str) else images
    return {"id": str(rid), "image": image, "conversations": conversations}


def iter_records(path: str | os.PathLike, skip_bad: bool = False, report: ReadReport | None = None) -> Iterator[dict]:
    """Stream canonical records from a JSON array or JSONL file.

    With `skip_bad`, invalid records and broken JSONL lines are skipped and noted in `report`;
    otherwise the first one raises RecordError / DataError naming the file and record.
    """
    path = Path(path)
    report = report if report is not None else ReadReport()
    for where, raw in iter_json_or_jsonl(path, skip_bad=skip_bad, errors=report.skipped):
        report.read += 1
        try:
            record = normalize_record(raw, f"{path}: {where}")
        except RecordError as e:
            if not skip_bad:
                raise
            report.skipped.append(str(e))
            continue
        report.kept += 1
        yield record


def load_records(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    skip_bad: bool = False,
    report: ReadReport | None = None,
):
    """Read a record file into a `datasets.Dataset` backed by an Arrow file under `cache_dir`.

    Records stream from the file into Arrow, so a large release file is never held in memory as text
    and as Python objects at once. Each call converts afresh (no fingerprint cache: a stale cache would
    hide an edited file and lose the skip report). Columns: `id`, `images` (list of paths, empty for
    text-only records), `conversations`.
    """
    import datasets

    report = report if report is not None else ReadReport()

    def gen():
        for rec in iter_records(path, skip_bad=skip_bad, report=report):
            yield {"id": rec["id"], "images": image_paths(rec), "conversations": rec["conversations"]}

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Value("string")),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return datasets.Dataset.from_generator(
        gen, features=features, cache_dir=str(cache_dir), keep_in_memory=False, fingerprint=os.urandom(8).hex()
    )
