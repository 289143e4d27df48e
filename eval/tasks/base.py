"""The common base of every benchmark task: the `Example` record and the `Task` class.

A task reads one split of one dataset release into a list of `Example`s. Subclasses only
say where the split lives (`_records`) and how one raw record becomes an `Example`
(`_example`); the base class does the rest: it picks the release format, turns each record
into an example, stops on (or, with `skip_bad=True`, skips and counts) bad records, and
refuses duplicate question ids.

Image paths: `Example.image` is relative to `Task.root` unless it is absolute;
`Task.image_path(example)` resolves it. Releases that ship images inside the data file
(the Hugging Face parquet releases) keep the encoded bytes in `Example.image_bytes` and use
the stored file name (or `<qid>.jpg`) as `image`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medllava.io import DataError

from medllava.eval.tasks import formats

log = logging.getLogger(__name__)

OPEN, CLOSED = "open", "closed"

# Answer-type spellings found in the releases; "yes/no", "other" and "number" are the
# PathVQA pickle's own labels.
_ANSWER_TYPES = {
    "open": OPEN,
    "other": OPEN,
    "number": OPEN,
    "closed": CLOSED,
    "close": CLOSED,
    "yes/no": CLOSED,
}
_YES_NO = {"yes", "no"}


@dataclass(frozen=True)
class Example:
    """One benchmark question.

    qid: the dataset's question id as a string (ids are ints in most releases, strings in some).
    answer_type: "open" or "closed".
    image: path relative to the task root, or absolute.
    meta: the dataset's own fields (organ, modality, question type, language, ...).
    image_bytes: the encoded image when the release stores it inline, else None.
    """

    qid: str
    question: str
    answer: str
    answer_type: str
    image: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)


def answer_text(value: Any, where: str) -> str:
    """The answer as a string: releases store some answers as JSON numbers (VQA-RAD "4")."""
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{where}: answer must be text or a number, got {value!r}")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: empty answer")
    return text


def parse_answer_type(value: Any, answer: str, where: str) -> str:
    """Map a release's answer-type label to "open"/"closed"; infer it when missing.

    Labels are compared stripped and lower-cased because VQA-RAD has "CLOSED " with a
    trailing space. A missing label is inferred: yes/no answers are closed, the rest open.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return infer_answer_type(answer)
    kind = _ANSWER_TYPES.get(str(value).strip().lower())
    if kind is None:
        raise DataError(f"{where}: unknown answer_type {value!r} (expected OPEN or CLOSED)")
    return kind


def infer_answer_type(answer: str) -> str:
    return CLOSED if answer.strip().strip(".!").lower() in _YES_NO else OPEN


def require_text(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty {key!r}")
    return value.strip()


class Task:
    """One split of one benchmark, loaded eagerly into `self.examples`.

    Options common to every task:
      file: read this file instead of looking for the split under `root` (any format the
        task reads, or a LLaVA conversation-format file such as LLaVA-Med's test.json).
      skip_bad: skip records that cannot be read, keeping their messages in `self.skipped`,
        instead of stopping at the first one.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    # Display name -> meta key, for per-category breakdowns.
    breakdowns: ClassVar[dict[str, str]] = {}
    # Breakdown keys whose values list several categories ("POS, PRES").
    multi_valued: ClassVar[frozenset[str]] = frozenset()
    # Task-specific options accepted as keywords (source=, lang=).
    known_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, root: str | Path, split: str = "test", *, file: str | Path | None = None,
                 skip_bad: bool = False, **options: Any):
        self.root = Path(root).expanduser().resolve()
        unknown = sorted(set(options) - self.known_options)
        if unknown:
            takes = ", ".join(sorted(self.known_options)) or "no options"
            raise ValueError(f"{self.name}: unknown option {', '.join(unknown)} (this task takes: {takes})")
        self.split = self._check_split(split)
        self.options = options
        self.skipped: list[str] = []
        self.source: Path | None = Path(file).expanduser().resolve() if file else None
        if self.source is None:
            self.source = self._find_file()
        self.examples = self._load(skip_bad)

    # -- what subclasses provide -----------------------------------------------------------
    def _find_file(self) -> Path:
        """The file holding `self.split` under `self.root`."""
        raise NotImplementedError

    def _records(self, path: Path) -> Iterator[tuple[str, dict]]:
        """Yield `(location, raw record)` for the split from `path` (location names file and record)."""
        raise NotImplementedError

    def _example(self, raw: dict, where: str) -> Example | None:
        """Turn one raw record into an Example, or None when it is outside the selection."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------
    def _first_release(self, candidates: dict[str, list], looked_for: str) -> Path:
        """The first existing file among `candidates` (release name -> paths, in preference order),
        or only among the release the `source` option names."""
        source = self.options.get("source", "auto")
        if source != "auto" and source not in candidates:
            raise ValueError(f"{self.name}: unknown source {source!r}; choose from auto, {', '.join(candidates)}")
        order = list(candidates) if source == "auto" else [source]
        for name in order:
            for path in candidates[name]:
                if path is not None and path.exists():
                    return path
        raise FileNotFoundError(f"{self.name}: no {'/'.join(order)} release for split {self.split!r} under {self.root} "
                                f"(looked for {looked_for})")

    def _check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; choose from {', '.join(self.splits)}")
        return split

    def _load(self, skip_bad: bool) -> list[Example]:
        path = self.source
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: {path} does not exist")
        if path.suffix.lower() == ".parquet":
            records, build = self._parquet_rows(path), self._parquet_example
        elif formats.is_conversation_file(path):
            records, build = formats.json_records(path), self._conversation_example
        else:
            records, build = self._records(path), self._example
        examples: list[Example] = []
        seen: dict[str, str] = {}
        for where, raw in records:
            try:
                if not isinstance(raw, dict):
                    raise DataError(f"{where}: expected a record object, got {type(raw).__name__}")
                if formats.ERROR_KEY in raw:
                    raise DataError(raw[formats.ERROR_KEY])
                ex = build(raw, where)
                if ex is not None and ex.qid in seen:
                    raise DataError(f"{where}: duplicate question id {ex.qid!r} (first at {seen[ex.qid]})")
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped.append(str(e))
                continue
            if ex is not None:
                seen[ex.qid] = where
                examples.append(ex)
        if self.skipped:
            log.warning("%s: skipped %d bad records in %s (first: %s)", self.name, len(self.skipped),
                        path, self.skipped[0])
        if not examples:
            raise DataError(f"{path}: no {self.name} examples for split {self.split!r}")
        return examples

    def _conversation_example(self, raw: dict, where: str) -> Example:
        """A record in the LLaVA conversation format (LLaVA-Med's per-benchmark test.json)."""
        question, answer = formats.conversation_qa(raw, where)
        answer = answer_text(answer, where)
        qid = raw.get("id", raw.get("question_id"))
        if qid is None:
            raise DataError(f"{where}: missing 'id'")
        meta = {k: v for k, v in raw.items() if k not in ("id", "image", "conversations", "conversatons", "answer_type")}
        return Example(str(qid), question, answer, parse_answer_type(raw.get("answer_type"), answer, where),
                       raw.get("image"), meta)

    def _parquet_rows(self, path: Path) -> Iterator[tuple[str, dict]]:
        for index, (where, row) in enumerate(formats.parquet_records(path)):
            row["_index"] = index  # the release has no question ids; the row number stands in
            yield where, row

    def _parquet_example(self, raw: dict, where: str) -> Example:
        """A row of a Hugging Face parquet release: image {bytes, path}, question, answer.

        These releases carry no answer type, so yes/no answers are closed and the rest open.
        """
        name, data = formats.parquet_image(raw, where)
        qid = f"{self.split}-{raw.pop('_index')}"
        answer = answer_text(raw.get("answer"), where)
        meta = {k: v for k, v in raw.items() if k not in ("image", "question", "answer")}
        return Example(qid, require_text(raw, "question", where), answer, infer_answer_type(answer),
                       name or f"{qid}.jpg", meta, data)

    def image_path(self, example: Example) -> Path | None:
        """Absolute path of the example's image (None when the release has no file for it)."""
        if example.image is None:
            return None
        path = Path(example.image)
        return path if path.is_absolute() else self.root / path

    def categories(self, example: Example) -> dict[str, list[str]]:
        """Breakdown name -> the category values this example counts under."""
        out = {}
        for name, key in self.breakdowns.items():
            value = example.meta.get(key)
            if value is None or value == "":
                continue
            parts = str(value).split(",") if name in self.multi_valued else [str(value)]
            out[name] = [p.strip() for p in parts if p.strip()]
        return out

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, source={str(self.source)!r})"
